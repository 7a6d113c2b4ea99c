"""Train one soft prompt on one SuperGLUE task and evaluate it (paper sections 3-5).

    python -m ptray.train --task cb --seed 0 --model PATH_OR_HUB_NAME --data-dir DIR --output-dir OUT

``train(cfg)`` is a plain function: it knows nothing of Ray or MLflow. A caller (the Ray trial) observes it through
``on_epoch_end(metrics, state)`` and resumes it from such a ``state``.
"""

from __future__ import annotations

import argparse
import logging
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ptray
from ptray import families, layout
from ptray.cli import OneLineParser, add_config_arguments, config_from_args
from ptray.config import TrainConfig
from ptray.errors import PtrayError
from ptray.evaluate import EvalResult
from ptray.files import atomic_folder, write_json
from ptray.model import load_model, model_dtype
from ptray.prompt import save_adapter

log = logging.getLogger("ptray")


@dataclass
class TrainResult:
    """What ``train`` returns: the best prompt, its metrics, the history, the resolved config and per-example
    results (``save_run`` writes them as a run folder)."""

    prompt: torch.Tensor  # best prompt rows [n, hidden], fp32, CPU
    metrics: dict[str, Any]  # final metrics (see ``metrics.json``)
    history: list[dict[str, Any]]  # per-epoch metrics
    resolved: dict[str, Any]  # the fully resolved config
    evals: dict[str, EvalResult] = field(default_factory=dict)  # "prompt", "no_prompt", "init_text"
    eval_idx: list[int] = field(default_factory=list)  # example idx for the per-example lists in ``evals``


def code_version() -> str:
    """ptray's version, plus the git commit when run from a checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{ptray.__version__}+{sha}" if sha else ptray.__version__


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (``seed`` in [0, 2**32 - 1], ``ptray.seeds.check_seed``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def compile_blocks(model) -> None:
    """``torch.compile`` each transformer block in place (regional compilation: the identical blocks share one
    compiled graph, so compiling takes seconds, not minutes); dynamic shapes, as batch lengths vary."""
    base = families.base_model(model)
    blocks = getattr(base, "h", None) or getattr(base, "layers", None)
    if blocks is None:
        raise PtrayError(f"--compile does not know where {type(model).__name__}'s transformer blocks are "
                         f"(base_model.h or base_model.layers); run without --compile")
    for block in blocks:
        block.compile(dynamic=True)


def setup_model(name_or_path: str, device: str, precision: str, compile: bool = False, attention: str = "eager",
                fold_alibi: bool = False):
    """The frozen model on its device, for training and evaluation alike: ``(model, tokenizer, accelerator)``.

    ``device`` and ``precision`` are resolved values (``resolve_device_precision``); weights load in
    ``model_dtype(precision)``; ``attention`` (resolved: eager or fused) "fused" runs BLOOM's attention through
    ``ptray.attention.use_fused_attention`` (``fold_alibi`` passed to it; other families are left as loaded);
    ``compile`` compiles each block (``compile_blocks``) after that. Raises ``PtrayError`` when the model cannot be
    loaded.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=precision, cpu=device == "cpu")
    model, tokenizer = load_model(name_or_path, dtype=model_dtype(precision))
    model.to(accelerator.device)
    if attention == "fused":
        from ptray.attention import use_fused_attention

        use_fused_attention(model, fold_alibi=fold_alibi)
    if compile:
        compile_blocks(model)
    return model, tokenizer, accelerator


def train(
    cfg: TrainConfig,
    on_epoch_end: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``cfg.task``'s soft prompt; early-stop on eval loss; return the best prompt and its metrics.

    A single trial is a trial group of one: ``ptray.group.train_group([cfg])`` runs the loop (per-epoch evaluation,
    early stopping, the best prompt restored, the final metrics). ``on_epoch_end(metrics, state)`` is called after
    every epoch; ``state`` (tensors and plain values, loadable with ``torch.load(weights_only=True)``) passed back as
    ``resume`` continues the run after that epoch. Raises ``PtrayError`` on bad input or a non-finite loss.
    """
    from ptray.group import train_group  # group.py builds on this module (setup_model, TrainResult): imported here

    def each(_index: int, metrics: dict[str, Any], state: dict[str, Any]) -> None:
        on_epoch_end(metrics, state)

    (result,) = train_group([cfg], each if on_epoch_end is not None else None, [resume])
    for key in ("group_size", "group_index"):  # a single run's config has no group
        result.resolved.pop(key)
    return result


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Refuse an output folder that already holds something, unless ``overwrite``."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise PtrayError(f"output path {str(out)!r} exists and is not a folder; choose another --output-dir")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PtrayError(
            f"output folder {str(out)!r} already holds another run; choose a new --output-dir or pass --overwrite"
        )
    return out


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


def build_parser() -> argparse.ArgumentParser:
    """``python -m ptray.train``'s flags: one per ``TrainConfig`` field, plus the output folder."""
    p = OneLineParser(prog="python -m ptray.train", description="Train and evaluate one soft prompt.")
    add_config_arguments(p, TrainConfig, required=("task", "seed"))
    p.add_argument("--output-dir", required=True, help="folder to write the run to (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --output-dir")
    return p


def main(argv: list[str] | None = None) -> int:
    """Train one prompt and write its run folder; returns the exit code (2 with one line on bad input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        cfg = config_from_args(TrainConfig, args)
        check_output_dir(args.output_dir, args.overwrite)  # before hours of training, not after
        result = train(cfg)
        out = save_run(result, args.output_dir, overwrite=args.overwrite)
    except PtrayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    m = result.metrics
    print(f"done: {m['task']} seed {m['seed']}: exact_match {m['exact_match']:.4f} rank_accuracy "
          f"{m['rank_accuracy']:.4f} eval_loss {m['eval_loss']:.4f} (best epoch {m['best_epoch']} of "
          f"{m['epochs_run']}); no prompt exact_match {m.get('no_prompt_exact_match', float('nan')):.4f}, "
          f"init text exact_match {m.get('init_text_exact_match', float('nan')):.4f}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
