"""What a study prints while it trains: by default a line per trial start, prompt epoch and failure (Ray Tune's own
tables with --verbose), and the checkpoint setting that keeps Tune from forcing an experiment snapshot every
second epoch (Ray's "snapshotting has been triggered multiple times" warning on short epochs)."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

from ptray.config import TrainConfig
from ptray.plan import Options, Plan
from ptray.study import tuner
from ptray.study.flags import build_parser, options_from_args, plan_from_args


def test_the_default_output_is_a_line_per_epoch_and_per_failure(tmp_path):
    plan = Plan(study="S", tasks=("cb",), seeds=(0, 1), group_size=1, train=TrainConfig(max_epochs=3))
    lines: list[str] = []
    progress = tuner.progress_lines(plan, Options(max_failures=2), say=lines.append)
    trial = SimpleNamespace(config={"task": "cb", "seed": 1}, error_file=str(tmp_path / "error.txt"))
    (tmp_path / "error.txt").write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                                        "RuntimeError: CUDA out of memory\n\n")
    progress.on_trial_start(0, [], trial)
    progress.on_trial_result(0, [], trial, {"prompt": "cb-seed1", "epoch": 1, "train_loss": 1.5, "eval_loss": 1.25,
                                            "exact_match": 0.5, "rank_accuracy": 0.75, "epoch_seconds": 3.0})
    progress.on_trial_recover(0, [], trial)
    progress.on_trial_result(0, [], trial, {"prompt": "cb-seed1", "done": 1})  # the last report: no line
    finished = SimpleNamespace(config={"task": "cb", "seed": 0}, status="TERMINATED")  # e.g. before a resume
    progress.on_trial_complete(0, [finished, trial], trial)
    progress.on_trial_error(0, [], trial)
    assert lines == [
        "cb-seed1: started",
        "cb-seed1 epoch 1/3: train_loss 1.5000, eval_loss 1.2500, exact_match 0.5000, rank_accuracy 0.7500",
        "cb-seed1: failed (RuntimeError: CUDA out of memory); retrying from its last checkpoint (up to 2 retries)",
        "cb-seed1: done (2/2 trials)",
        f"cb-seed1: failed for good (RuntimeError: CUDA out of memory); the error in full: {tmp_path / 'error.txt'}",
    ]


def test_quiet_tune_drops_trial_tracebacks_and_info_only_while_it_runs(caplog):
    controller = logging.getLogger("ray.tune.execution.tune_controller")
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    with caplog.at_level(logging.INFO, logger="ray.tune"):
        with tuner._quiet_tune(True):
            controller.error("Trial task failed for trial cb-seed0", exc_info=RuntimeError("boom"))
            logging.getLogger("ray.tune.tune").info("Wrote the latest version of all result files")
            logging.getLogger("ray.tune.tune").warning("a warning stays")
            assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"  # the legacy engine: silent at verbose 0
        controller.error("Trial task failed for trial cb-seed1")  # --verbose (or after the fit): Tune's own
    assert [r.getMessage() for r in caplog.records] == ["a warning stays", "Trial task failed for trial cb-seed1"]
    assert os.environ.get("RAY_AIR_NEW_OUTPUT") == before


def test_the_smoke_study_forces_no_experiment_snapshot():
    """Tune forces an experiment-state snapshot once a trial has checkpointed ``num_to_keep`` times since the last
    one; with 2 kept, every smoke trial (2 epochs, a checkpoint each) forced one, seconds apart: Ray's warning."""
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    args = build_parser().parse_args(["--smoke"])
    assert not options_from_args(args).verbose
    assert options_from_args(build_parser().parse_args(["--smoke", "--verbose"])).verbose
    smoke = plan_from_args(args)

    def forced(num_to_keep: int) -> bool:
        """Whether the smoke's trials, a checkpoint per epoch, make Tune force a snapshot (before any periodic one,
        which would reset the counts)."""
        manager = _ExperimentCheckpointManager(storage=None, checkpoint_period="auto",
                                               sync_every_n_trial_checkpoints=num_to_keep)
        for _ in range(smoke.train.max_epochs):
            for trial in range(len(smoke.trials)):
                manager.on_trial_checkpoint(trial)
        return manager._should_force_sync_up

    assert forced(2)  # the old setting
    assert not forced(tuner.KEEP_CHECKPOINTS)
