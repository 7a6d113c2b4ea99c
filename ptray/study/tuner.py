"""The Tuner that runs a study's trials (``ptray.study.trial``), and what Tune saved of them.

Tune's saved experiment, not its in-memory results, says which trials finished: that is what ``--resume`` restores
and what the driver counts.
"""

from __future__ import annotations

import logging

from ptray import layout
from ptray.config import Options, Plan
from ptray.study.context import StudyContext
from ptray.study.paths import tune_path
from ptray.study.trial import group_key, train_group_trial, train_trial, trial_members


def _trial_name(trial) -> str:
    """A trial's prompts' run names: ``cb-seed0``, or ``cb-seed0+cb-seed1`` for a group."""
    return "+".join(layout.train_run_name(t, s) for t, s in trial_members(trial.config))


def _trial_dirname(trial) -> str:
    return f"{_trial_name(trial)}_{trial.trial_id}"


def train_phase(plan: Plan, opts: Options, ctx: StudyContext, storage: str, gpus: float) -> dict[str, int]:
    """One Tune trial per (task, seed), or per group of ``plan.group_size`` of them (``plan.groups()``) when that is
    above 1; or Tune's restore of them on ``--resume`` (the stored plan keeps its grouping). Either way the trial is
    ``ptray.study.trial.run_group``. ``gpus``: the GPU fraction of each Tune trial (a group's, when grouped).

    Returns counts of trials ``done``, ``failed`` and ``interrupted`` (unfinished after fit, e.g. by Ctrl-C).
    """
    from ray import tune

    grouped = plan.group_size > 1
    # One Tune function under two names: Tune restores a study only with the trainable name it was saved with, and
    # studies were saved as train_trial (one prompt per trial) or train_group_trial (groups).
    function = train_group_trial if grouped else train_trial
    trainable = tune.with_resources(tune.with_parameters(function, ctx=ctx),
                                    {"cpu": opts.cpus_per_trial, "gpu": gpus})
    if grouped:
        space = {"group": tune.grid_search([group_key(g) for g in plan.groups()])}
    else:  # the config of a single trial stays task and seed: its run is logged as no group's member
        space = {"task": tune.grid_search(list(plan.tasks)), "seed": tune.grid_search(list(plan.seeds))}
    path = tune_path(storage, plan.study)
    if opts.resume and tune_state_exists(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        # Trials with the same resources reuse their worker process: imports and the model cache stay warm.
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(reuse_actors=True, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=plan.study, storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=opts.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            ),
        )
    tuner.fit()
    return trial_counts(path)


def trial_counts(path: str) -> dict[str, int]:
    """Trials done, failed and left unfinished, from the experiment state Tune saved last."""
    statuses = list(trial_statuses(path).values())
    done, failed = statuses.count("TERMINATED"), statuses.count("ERROR")
    return {"done": done, "failed": failed, "interrupted": len(statuses) - done - failed}


def trial_statuses(path: str) -> dict[str, str]:
    """Each trial's status (TERMINATED, ERROR, PENDING, ...) by name, as saved in the Tune experiment at ``path``.

    Read back from storage because after a Ctrl-C Tune marks every stopped trial TERMINATED in memory, while the
    state it saved first says which ones had not finished.
    """
    from ray import tune

    quiet_logger = logging.getLogger("ray.tune")
    level = quiet_logger.level
    quiet_logger.setLevel(logging.ERROR)  # unstarted trials have no results: a warning per trial otherwise
    try:
        return {str(t): t.status for t in tune.ExperimentAnalysis(path).trials}
    finally:
        quiet_logger.setLevel(level)


def tune_state_exists(path: str) -> bool:
    """Whether ``path`` holds a Tune experiment that can be restored."""
    from ray import tune

    try:
        return tune.Tuner.can_restore(path)
    except Exception:  # an unreachable bucket is reported by Tune itself when it starts
        return False
