"""The Tuner that runs a study's trials (``ptray.study.trial``), and what Tune saved of them.

Tune's saved experiment, not its in-memory results, says which trials finished: that is what ``--resume`` restores
and what the driver counts.
"""

from __future__ import annotations

import logging
import os

from ptray import layout
from ptray.plan import Options, Plan
from ptray.study import tracking
from ptray.study.context import StudyContext
from ptray.study.declared import Search
from ptray.study.paths import tune_path
from ptray.study.trial import group_key, train_group_trial, train_trial, trial_members

STOPPED_BY = {"asha": "asha"}  # a declaration's scheduler -> the TAG_STOPPED_BY value of the runs it stops


def _trial_name(trial) -> str:
    """A trial's prompts' run names: ``cb-seed0``, or ``cb-seed0+cb-seed1`` for a group."""
    return "+".join(layout.train_run_name(*m) for m in trial_members(trial.config))


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
    trainable = tune.with_resources(tune.with_parameters(function, ctx=ctx, conditions=trial_conditions(plan)),
                                    {"cpu": opts.cpus_per_trial, "gpu": gpus})
    space = param_space(plan)
    path = tune_path(storage, plan.study)
    if opts.resume and tune_state_exists(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        # Trials with the same resources reuse their worker process: imports and the model cache stay warm.
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(reuse_actors=True, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_dirname, scheduler=scheduler(plan)),
            run_config=tune.RunConfig(
                name=plan.study, storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=opts.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            ),
        )
    tuner.fit()
    finish_stopped(plan, ctx, trial_statuses(path))
    return trial_counts(path)


def trial_conditions(plan: Plan) -> dict[str, dict]:
    """Each trial condition (a member's third element: a declared condition, or a search's sample) -> the
    ``TrainConfig`` overrides it trains with (its declared condition's)."""
    return {m[2]: dict(plan.conditions.get(plan.condition_of(m), {})) for m in plan.trials if len(m) > 2}


def param_space(plan: Plan) -> dict:
    """Tune's ``param_space``: a grid of groups (``plan.groups()``), or of task x seed (x condition) for one prompt
    per trial, with a declared search's distributions."""
    from ray import tune

    if (plan.group_size or 1) > 1 and not plan.search:
        return {"group": tune.grid_search([group_key(g) for g in plan.groups()])}
    # the config of a single trial stays task and seed: its run is logged as no group's member
    space = {"task": tune.grid_search(list(plan.tasks)), "seed": tune.grid_search(list(plan.seeds))}
    conditions = list(dict.fromkeys(m[2] for m in plan.trials if len(m) > 2))
    if conditions:
        space["condition"] = tune.grid_search(conditions)
    for name, spec in plan.search.get("space", {}).items():
        space[name] = Search(**{**spec, "values": tuple(spec.get("values", ()))}).to_tune()
    return space


def scheduler(plan: Plan):
    """The declared search's scheduler: ASHA on the per-epoch metric (time attribute ``epoch``), one per task (and
    condition): losses of different tasks are not comparable. None (FIFO) otherwise."""
    if plan.search.get("scheduler") != "asha":
        return None
    from ptray.study.schedulers import PerTaskASHA

    max_t = max(plan.trial_config(m).max_epochs for m in plan.trials)
    return PerTaskASHA(plan.search["metric"], plan.search["mode"], max_t, bool(plan.conditions))


def finish_stopped(plan: Plan, ctx: StudyContext, statuses: dict[str, str]) -> list[str]:
    """Mark KILLED, tagged ``TAG_STOPPED_BY``, the train runs of the trials the search's scheduler stopped: Tune
    ended them (TERMINATED) while their run was still RUNNING (a trial that ends by itself finishes its run first).
    Returns their names. Nothing for a study without a scheduler."""
    by = STOPPED_BY.get(plan.search.get("scheduler", ""))
    if by is None:
        return []
    client, stopped = ctx.client(), []
    for name, status in statuses.items():
        if status != "TERMINATED" or "+" in name:  # a searched trial is one prompt
            continue
        run = tracking.find_run(client, ctx.experiment_id, ctx.study, name)
        if run is not None and run.info.status == layout.RUNNING:
            client.set_tag(run.info.run_id, layout.TAG_STOPPED_BY, by)
            client.set_terminated(run.info.run_id, status=layout.KILLED)
            stopped.append(name)
    return stopped


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
    if "://" not in path and not os.path.exists(path):  # a local folder that is not there: no need to load Ray
        return False
    from ray import tune

    try:
        return tune.Tuner.can_restore(path)
    except Exception:  # an unreachable bucket is reported by Tune itself when it starts
        return False
