"""A run folder: what one training run leaves on disk (the prompt as a PEFT adapter, metrics, history, predictions,
the resolved config), written whole or not at all. ``docs/tracking.md`` lists the files."""

from __future__ import annotations

from pathlib import Path

from ptray import layout
from ptray.files import atomic_folder, check_output_folder, write_json
from ptray.lm.prompt import save_adapter
from ptray.training.loop import TrainResult


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Refuse, before training, a run folder that could not be written at the end (``check_output_folder``): one
    under a file, not writable, or already holding another run unless ``overwrite``."""
    return check_output_folder(path, "--output-dir", overwrite, holds="another run")


def save_run(result: TrainResult, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write prompt/ (PEFT adapter), metrics.json, history.json, predictions.json and config.json atomically.

    Files go to a sibling temp folder renamed into place at the end, so a failure never leaves a half-written run.
    ``predictions.json`` follows ``layout.predictions`` (the prompt's lists, the baselines' under ``baselines``).
    Returns the folder; raises ``PtrayError`` when ``out_dir`` holds another run and ``overwrite`` is False.
    """
    out = check_output_dir(out_dir, overwrite)
    with atomic_folder(out) as tmp:
        save_adapter(result.prompt, tmp / layout.PROMPT_DIR, result.resolved["model"], result.resolved["init_text"],
                     result.resolved["init"])
        write_json(tmp / layout.METRICS_FILE, result.metrics)
        write_json(tmp / layout.HISTORY_FILE, result.history)
        write_json(tmp / layout.CONFIG_FILE, result.resolved)
        baselines = {name: res for name, res in result.evals.items() if name != "prompt"}
        write_json(tmp / layout.PREDICTIONS_FILE, layout.predictions(result.eval_idx, result.evals["prompt"],
                                                                     baselines))
    return out
