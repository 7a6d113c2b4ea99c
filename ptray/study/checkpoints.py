"""A Tune trial's checkpoint: the latest epoch state of each of its prompts, with the MLflow run it logs into.

Every trial, a single prompt or a group, writes one layout: a folder per prompt still training, named by its run
name, each holding ``STATE_FILE`` (``train``'s epoch state) and ``RUN_FILE`` (its MLflow run id and epoch)::

    <checkpoint>/cb-seed0/state.pt
    <checkpoint>/cb-seed0/run.json

Single trials of earlier versions wrote the two files at the top of the checkpoint, without the prompt's folder; a
study started then and resumed now still continues from them (``load_trial_checkpoint``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ptray.errors import PtrayError
from ptray.files import disk_space, write_json

STATE_FILE = "state.pt"
RUN_FILE = "run.json"

# run name -> (a prompt's latest epoch state, its MLflow run id): what a trial's checkpoint holds.
States = dict[str, tuple[dict[str, Any], str]]


def save_checkpoint(folder: str | Path, state: dict[str, Any], run_id: str) -> None:
    """Write one prompt's epoch ``state`` (``train``'s ``on_epoch_end``) and its MLflow run id into ``folder``.

    Raises:
        PtrayError: the disk is full (``ptray.files.disk_full_error``, naming ``folder``).
    """
    import torch

    folder = Path(folder)
    # Serialised in memory (a prompt and its optimizer state: small), then written by Python: on a full disk
    # torch's own file writer fails with "unexpected pos 64 vs 0", which never says the disk is full.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with disk_space(folder):
        (folder / STATE_FILE).write_bytes(buffer.getvalue())
    write_json(folder / RUN_FILE, {"run_id": run_id, "epoch": state["epoch"]})


def load_checkpoint(folder: str | Path) -> dict[str, Any]:
    """The state saved by ``save_checkpoint`` plus ``run_id``; tensors and plain values only (weights_only)."""
    import torch

    folder = Path(folder)
    state = torch.load(folder / STATE_FILE, weights_only=True, map_location="cpu")
    state["run_id"] = json.loads((folder / RUN_FILE).read_text())["run_id"]
    return state


def save_trial_checkpoint(folder: str | Path, states: States) -> None:
    """A trial's checkpoint: one ``save_checkpoint`` folder per prompt still training, named by its run name."""
    for name, (state, run_id) in states.items():
        sub = Path(folder) / name
        sub.mkdir(parents=True, exist_ok=True)
        save_checkpoint(sub, state, run_id)


def load_trial_checkpoint(folder: str | Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Run name -> ``load_checkpoint`` state, for every prompt in a trial checkpoint.

    Args:
        folder: the checkpoint, as ``save_trial_checkpoint`` wrote it, or as a single trial of an earlier version
            did (``STATE_FILE`` and ``RUN_FILE`` at the top).
        names: the run names of the trial's prompts; an earlier single trial's checkpoint is the state of its only
            prompt.

    Raises:
        PtrayError: an earlier single trial's checkpoint read for a trial of several prompts.
    """
    folder = Path(folder)
    if (folder / STATE_FILE).exists():
        if len(names) != 1:
            raise PtrayError(f"{folder} is a single trial's checkpoint, but the trial trains {len(names)} prompts "
                             f"({', '.join(names)})")
        return {names[0]: load_checkpoint(folder)}
    return {sub.name: load_checkpoint(sub) for sub in sorted(folder.iterdir()) if (sub / STATE_FILE).exists()}
