"""Train one soft prompt on one SuperGLUE task and evaluate it (paper sections 3-5).

    python -m ptray.train --task cb --seed 0 --model PATH_OR_HUB_NAME --data-dir DIR --output-dir OUT

``train(cfg)`` is a plain function: it knows nothing of Ray or MLflow. A caller (the Ray trial) observes it through
``on_epoch_end(metrics, state)`` and resumes it from such a ``state``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from ptray.cli import OneLineParser, add_config_arguments, config_from_args
from ptray.config import TrainConfig
from ptray.data.tasks import add_task_file_argument, register_task_files
from ptray.errors import PtrayError
from ptray.files import disk_full_from, is_disk_full
from ptray.training.loop import TrainResult, train_group
from ptray.training.run_folder import check_output_dir, save_run

log = logging.getLogger("ptray")


def train(
    cfg: TrainConfig,
    on_epoch_end: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``cfg.task``'s soft prompt; early-stop on eval loss; return the best prompt and its metrics.

    A single trial is a trial group of one: ``train_group([cfg])`` runs the loop (per-epoch evaluation, early
    stopping, the best prompt restored, the final metrics). ``on_epoch_end(metrics, state)`` is called after
    every epoch; ``state`` (tensors and plain values, loadable with ``torch.load(weights_only=True)``) passed back as
    ``resume`` continues the run after that epoch. Raises ``PtrayError`` on bad input or a non-finite loss.
    """
    def each(_index: int, metrics: dict[str, Any], state: dict[str, Any]) -> None:
        on_epoch_end(metrics, state)

    (result,) = train_group([cfg], each if on_epoch_end is not None else None, [resume])
    for key in ("group_size", "group_index"):  # a single run's config has no group
        result.resolved.pop(key)
    return result


def build_parser(prog: str = "python -m ptray.train") -> argparse.ArgumentParser:
    """``ptray train``'s flags (also ``python -m ptray.train``): one per ``TrainConfig`` field, plus the output
    folder."""
    p = OneLineParser(prog=prog, description="Train and evaluate one soft prompt.")
    add_config_arguments(p, TrainConfig, required=("task", "seed"))
    add_task_file_argument(p)
    p.add_argument("--output-dir", required=True, help="folder to write the run to (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --output-dir")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m ptray.train") -> int:
    """Train one prompt and write its run folder; returns the exit code (2 with one line on bad input)."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        register_task_files(args.task_files)  # before the task name is looked up
        cfg = config_from_args(TrainConfig, args)
        check_output_dir(args.output_dir, args.overwrite)  # before hours of training, not after
        result = train(cfg)
        out = save_run(result, args.output_dir, overwrite=args.overwrite)
    except PtrayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk where no writer of ours said which folder
        if not is_disk_full(err):
            raise
        print(f"error: {disk_full_from(err)}", file=sys.stderr)
        return 2
    m = result.metrics
    print(f"done: {m['task']} seed {m['seed']}: exact_match {m['exact_match']:.4f} rank_accuracy "
          f"{m['rank_accuracy']:.4f} eval_loss {m['eval_loss']:.4f} (best epoch {m['best_epoch']} of "
          f"{m['epochs_run']}); no prompt exact_match {m.get('no_prompt_exact_match', float('nan')):.4f}, "
          f"init text exact_match {m.get('init_text_exact_match', float('nan')):.4f}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
