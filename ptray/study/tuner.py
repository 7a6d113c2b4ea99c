"""The Tuner that runs a study's trials (``ptray.study.trial``), and what Tune saved of them.

Tune's saved experiment, not its in-memory results, says which trials finished: that is what ``--resume`` restores
and what the driver counts.
"""

from __future__ import annotations

import contextlib
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
    verbose, callbacks = (2, []) if opts.verbose else (0, [progress_lines(plan, opts)])
    if opts.resume and tune_state_exists(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        # Tune restores the first run's RunConfig; what is printed is this run's choice (--verbose or not)
        restored = getattr(tuner, "_local_tuner", None)
        if restored is not None:
            restored.get_run_config().verbose, restored.get_run_config().callbacks = verbose, callbacks
    else:
        # Trials with the same resources reuse their worker process: imports and the model cache stay warm.
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(reuse_actors=True, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_dirname, scheduler=scheduler(plan)),
            run_config=tune.RunConfig(
                name=plan.study, storage_path=storage, verbose=verbose, callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=opts.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            ),
        )
    with _quiet_tune(not opts.verbose):
        tuner.fit()
    finish_stopped(plan, ctx, trial_statuses(path))
    return trial_counts(path)


# Checkpoints Tune keeps per trial (one per epoch). Tune snapshots its experiment state every >= 10 s, and forces a
# snapshot whenever a trial has checkpointed num_to_keep times since the last one, so that the state never names a
# deleted checkpoint. Keeping 2, every second epoch forced one: with epochs of a second or two (the smoke study) many
# per second, Ray's "Experiment state snapshotting has been triggered multiple times" warning. Keeping 10, a trial
# forces one only when 10 of its epochs fit between two periodic snapshots; each checkpoint is a prompt and its
# optimizer state (tens of KB to a few MB).
KEEP_CHECKPOINTS = 10


def progress_lines(plan: Plan, opts: Options, say=None):
    """The training phase's default output, a Tune callback on the driver (Ray's own trial tables need
    ``--verbose``): a line when a trial starts, one per prompt and epoch (``cb-seed0 epoch 1/50: eval_loss ...``),
    one per failure (retried or final: the error's last line, not its traceback) and per finished trial with the
    count of trials done."""
    from ray import tune

    say = say or (lambda line: print(line, flush=True))
    total = len(plan.groups()) if (plan.group_size or 1) > 1 and not plan.search else len(plan.trials)
    epochs = {layout.train_run_name(*m): plan.trial_config(m).max_epochs for m in plan.trials}

    class ProgressLines(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            say(f"{_trial_name(trial)}: started")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            name = result.get("prompt")
            if name is None or "epoch" not in result:  # a trial's last report: its final metrics
                return
            shown = ", ".join(f"{k} {result[k]:.4f}" for k in ("train_loss", "eval_loss", "exact_match",
                                                               "rank_accuracy") if k in result)
            say(f"{name} epoch {result['epoch']}/{epochs.get(name, '?')}: {shown}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            # counted from Tune's trials, so that a resumed study counts those finished before it too
            done = {id(t) for t in trials if getattr(t, "status", None) == "TERMINATED"} | {id(trial)}
            say(f"{_trial_name(trial)}: done ({len(done)}/{total} trials)")

        def on_trial_recover(self, iteration, trials, trial, **info):
            say(f"{_trial_name(trial)}: failed ({_error_line(trial)}); retrying from its last checkpoint "
                f"(up to {opts.max_failures} retries)")

        def on_trial_error(self, iteration, trials, trial, **info):
            say(f"{_trial_name(trial)}: failed for good ({_error_line(trial)}); the error in full: "
                f"{getattr(trial, 'error_file', None) or 'its trial folder'}")

    return ProgressLines()


def _error_line(trial) -> str:
    """The last line of a failed trial's error (the exception itself, not the traceback above it)."""
    path = getattr(trial, "error_file", None)
    try:
        lines = [line for line in open(path).read().splitlines() if line.strip()] if path else []  # noqa: SIM115
    except OSError:
        lines = []
    return lines[-1].strip()[:300] if lines else "see its trial folder"


class _DropTrialTracebacks(logging.Filter):
    """Tune logs each failed trial's traceback; quiet, the callback's one line says it instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Trial task failed")


@contextlib.contextmanager
def _quiet_tune(quiet: bool):
    """Without --verbose: Tune's INFO lines, trial tracebacks and experiment header off while it runs (its warnings
    stay). The header ("Configuration for experiment", "View detailed results here") is printed by Tune's new
    output engine even at verbose 0; its legacy engine, at verbose 0, prints nothing."""
    if not quiet:
        yield
        return
    tune_log, controller = logging.getLogger("ray.tune"), logging.getLogger("ray.tune.execution.tune_controller")
    level, drop, engine = tune_log.level, _DropTrialTracebacks(), os.environ.get(_OUTPUT_ENGINE)
    tune_log.setLevel(logging.WARNING)
    controller.addFilter(drop)
    os.environ[_OUTPUT_ENGINE] = "0"
    try:
        yield
    finally:
        tune_log.setLevel(level)
        controller.removeFilter(drop)
        if engine is None:
            os.environ.pop(_OUTPUT_ENGINE, None)
        else:
            os.environ[_OUTPUT_ENGINE] = engine


_OUTPUT_ENGINE = "RAY_AIR_NEW_OUTPUT"  # "0": Tune's legacy console output


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
