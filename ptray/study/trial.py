"""One Tune trial trains one (task, seed) prompt, or a group of them (``run_group``), each prompt into its own MLflow
run; the Tuner runs the study's grid of them.

``train_trial`` is the thin Tune function (config dict -> ``TrainConfig`` -> ``train`` -> ``tune.report``);
``run_training`` holds the logic without Ray, so tests drive it with a fake ``report``. Both are safe to run
again: a trial finds its run by name (or through its checkpoint) and never duplicates it.

Order of writes, which is what keeps a resumed run's history contiguous: each epoch's checkpoint is persisted
(``tune.report``) before the epoch is logged to MLflow; a resumed trial logs what its checkpoint holds and MLflow
lacks (``tracking.sync_history``), then continues with the next epoch.
"""

from __future__ import annotations

import json
import logging
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ptray import layout
from ptray.config import Options, Plan
from ptray.files import write_json
from ptray.study import tracking
from ptray.study.context import StudyContext, quiet

log = logging.getLogger("ptray")

STATE_FILE = "state.pt"
RUN_FILE = "run.json"

# Config fields that ``train`` resolves (None -> the init text's length, auto -> cuda/bf16, ...): logged only once
# resolved, since MLflow never changes a param after it is set.
RESOLVED_LATER = ("init_text", "num_tokens", "device", "precision", "attention")


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(folder: str | Path, state: dict[str, Any], run_id: str) -> None:
    """Write a trial's epoch ``state`` (``train``'s ``on_epoch_end``) and its MLflow run id into ``folder``."""
    import torch

    folder = Path(folder)
    torch.save(state, folder / STATE_FILE)
    write_json(folder / RUN_FILE, {"run_id": run_id, "epoch": state["epoch"]})


def load_checkpoint(folder: str | Path) -> dict[str, Any]:
    """The state saved by ``save_checkpoint`` plus ``run_id``; tensors and plain values only (weights_only)."""
    import torch

    folder = Path(folder)
    state = torch.load(folder / STATE_FILE, weights_only=True, map_location="cpu")
    state["run_id"] = json.loads((folder / RUN_FILE).read_text())["run_id"]
    return state


# ---------------------------------------------------------------------------------------------------------------
# the trial


# report(metrics, state, run_id): persist a checkpoint of ``state`` (None: none) and hand ``metrics`` to Tune.
Report = Callable[[dict[str, Any], "dict[str, Any] | None", str], None]


def train_trial(config: dict[str, Any], ctx: StudyContext) -> None:
    """Tune function: train ``config['task']`` with ``config['seed']``, resuming from Tune's checkpoint if any."""
    quiet()
    run_training(config, ctx, _tune_resume(load_checkpoint), _tune_report)


def _tune_resume(load: Callable[[str], Any]) -> Any:
    """What ``load`` reads from the trial's Tune checkpoint folder, or None when the trial starts fresh."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return load(folder)


def _tune_report(metrics: dict[str, Any], state: dict[str, Any] | None, run_id: str) -> None:
    from ray import tune

    if state is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="ptray-ckpt-") as folder:
        save_checkpoint(folder, state, run_id)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))  # persisted before it returns


def run_training(config: dict[str, Any], ctx: StudyContext, resume: dict[str, Any] | None,
                 report: Report) -> dict[str, Any]:
    """Train one prompt into its MLflow run (found again, never duplicated); return the final metrics.

    ``resume`` is a checkpoint's state (``load_checkpoint``). A run that is already FINISHED (the trial completed but
    Tune never heard of it, e.g. the driver was killed) is reported again without training.
    """
    from ptray.training.train import train

    task, seed = config["task"], int(config["seed"])
    cfg = ctx.train_config(task, seed)
    client = ctx.client()
    name = layout.train_run_name(task, seed)
    run = _train_run(client, ctx, name, task, seed, resume)
    if run.info.status == layout.FINISHED:
        final = tracking.final_metrics(run)
        log.info("%s already finished in MLflow run %s; not training again", name, run.info.run_id)
        report({**final, "done_before": 1}, None, run.info.run_id)
        return final

    run_id = _open_run(client, ctx, run, cfg, resume)

    def on_epoch_end(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        report(metrics, state, run_id)  # the checkpoint first: see the module docstring
        tracking.log_metrics(client, run_id, tracking.epoch_metrics(metrics), step=metrics["epoch"])

    try:
        result = train(cfg, on_epoch_end=on_epoch_end, resume=_train_state(resume))
    except BaseException:
        mark_failed(client, run_id)
        raise
    finish_train_run(client, run_id, result, ctx.logged_config(result.resolved))
    final = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and k != "seed"}
    report(final, None, run_id)
    return final


def _open_run(client, ctx: StudyContext, run, cfg, resume: dict[str, Any] | None) -> str:
    """Make ``run`` RUNNING on this node with the checkpointed history (``tracking.sync_history``) and the params
    known before training; return the run id to log into."""
    history = list(resume["history"]) if resume else []
    run_id = tracking.sync_history(client, run, history)
    client.update_run(run_id, status=layout.RUNNING)
    client.set_tag(run_id, layout.TAG_NODE, socket.gethostname())
    if _ray_node_id():
        client.set_tag(run_id, layout.TAG_RAY_NODE_ID, _ray_node_id())
    if resume:
        client.set_tag(run_id, layout.TAG_RESUMED_AFTER_EPOCH, str(resume["epoch"]))
    known = {k: v for k, v in cfg.to_dict().items() if k not in RESOLVED_LATER}
    tracking.log_params_once(client, run_id, ctx.logged_config(known))
    return run_id


def finish_train_run(client, run_id: str, result, config: dict[str, Any]) -> None:
    """Log a finished training into its run: the resolved ``config`` as params (and ``config.json``), the final
    metrics (prefixed ``final_``), ``save_run``'s files as artifacts; then mark the run FINISHED.

    ``result`` is ``train``'s ``TrainResult``. A failure marks the run FAILED and is raised again.
    """
    from ptray.training.run_folder import save_run

    try:
        # Resolved values (n tokens, init text, device, precision, code version) are known only now.
        tracking.log_params_once(client, run_id, config)
        tracking.log_metrics(client, run_id, {layout.FINAL_PREFIX + k: v for k, v in result.metrics.items()
                                              if k not in ("task", "seed")})
        with tempfile.TemporaryDirectory(prefix="ptray-run-") as tmp:
            out = save_run(result, Path(tmp) / "run")
            write_json(out / layout.CONFIG_FILE, config)
            client.log_artifacts(run_id, str(out))
    except BaseException:
        mark_failed(client, run_id)
        raise
    client.set_terminated(run_id, status=layout.FINISHED)


def mark_failed(client, run_id: str) -> None:
    """FAILED, if the store still answers: the error that got us here is the one to report, not this one."""
    try:
        client.set_terminated(run_id, status=layout.FAILED)
    except Exception as err:  # noqa: BLE001 - any store error; the original exception follows
        log.warning("could not mark MLflow run %s FAILED: %s", run_id, err)


def _ray_node_id() -> str:
    """The Ray node this process runs on ("" outside Ray): which node a run was last on, for people and tests."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except ImportError:
        return ""


def _train_run(client, ctx: StudyContext, name: str, task: str, seed: int, resume: dict[str, Any] | None):
    """The trial's MLflow run: the checkpoint's, else the one of that name in the study, else a new one."""
    if resume and resume.get("run_id"):
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(resume["run_id"])
        except MlflowException:  # deleted for good, or another store: fall back to the name
            run = None
        if run is not None and run.info.lifecycle_stage == "active":
            return run
    run = tracking.find_run(client, ctx.experiment_id, ctx.study, name)
    if run is None:
        run = tracking.create_run(client, ctx.experiment_id, name, layout.run_tags(ctx.study, layout.TRAIN, task, seed))
    return run


def _train_state(resume: dict[str, Any] | None) -> dict[str, Any] | None:
    if resume is None:
        return None
    return {k: v for k, v in resume.items() if k != "run_id"}


# ---------------------------------------------------------------------------------------------------------------
# the group trial: several prompts, one frozen model (ptray.group), each prompt still its own MLflow run


def group_key(members) -> str:
    """A group's (task, seed) prompts as the Tune config value: ``"cb:0,cb:1"`` (a string: Tune would try to
    resolve nested lists as search spaces)."""
    return ",".join(f"{task}:{seed}" for task, seed in members)


def parse_group_key(key: str) -> list[tuple[str, int]]:
    """Inverse of ``group_key``."""
    return [(task, int(seed)) for task, seed in (part.split(":") for part in key.split(","))]


def save_group_checkpoint(folder: str | Path, states: dict[str, tuple[dict[str, Any], str]]) -> None:
    """A group's Tune checkpoint: one ``save_checkpoint`` folder per prompt still training, named by its run name
    (``states``: run name -> (its latest epoch state, its MLflow run id))."""
    for name, (state, run_id) in states.items():
        sub = Path(folder) / name
        sub.mkdir(parents=True, exist_ok=True)
        save_checkpoint(sub, state, run_id)


def load_group_checkpoint(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Run name -> ``load_checkpoint`` state, for every prompt in a group checkpoint."""
    return {sub.name: load_checkpoint(sub) for sub in sorted(Path(folder).iterdir())
            if (sub / STATE_FILE).exists()}


# report(metrics, states): persist a group checkpoint of ``states`` (run name -> (state, run_id); None: none) and
# hand ``metrics`` to Tune.
GroupReport = Callable[[dict[str, Any], "dict[str, tuple[dict[str, Any], str]] | None"], None]


def train_group_trial(config: dict[str, Any], ctx: StudyContext) -> None:
    """Tune function: train the prompts of ``config['group']`` together, resuming from Tune's checkpoint if any."""
    quiet()
    run_group(config, ctx, _tune_resume(load_group_checkpoint), _tune_group_report)


def _tune_group_report(metrics: dict[str, Any], states: dict[str, tuple[dict[str, Any], str]] | None) -> None:
    from ray import tune

    if states is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="ptray-ckpt-") as folder:
        save_group_checkpoint(folder, states)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))  # persisted before it returns


def run_group(config: dict[str, Any], ctx: StudyContext, resume: dict[str, dict[str, Any]] | None,
              report: GroupReport) -> dict[str, dict[str, Any]]:
    """Train a group of prompts (``config['group']``, a ``group_key``) with ``train_group``, each into
    its own MLflow run exactly as ``run_training`` would; return each prompt's final metrics by run name.

    ``resume`` (``load_group_checkpoint``) holds the prompts' last checkpointed epochs. Every epoch's report carries
    a checkpoint of the latest state of every prompt still training, written before that epoch reaches MLflow. A
    prompt that leaves the group (early stopping, last epoch) has its run finished at once; one whose run is
    already FINISHED is not trained again.
    """
    from ptray.training.loop import train_group

    members = parse_group_key(config["group"])
    resume = resume or {}
    client = ctx.client()
    finals: dict[str, dict[str, Any]] = {}
    latest: dict[str, tuple[dict[str, Any], str]] = {}  # what the group's checkpoint holds
    todo: list[dict[str, Any]] = []  # the prompts to train: name, index in the group, cfg, run id, resume state
    for index, (task, seed) in enumerate(members):
        name = layout.train_run_name(task, seed)
        state = resume.get(name)
        run = _train_run(client, ctx, name, task, seed, state)
        if run.info.status == layout.FINISHED:
            finals[name] = tracking.final_metrics(run)
            log.info("%s already finished in MLflow run %s; not training again", name, run.info.run_id)
            continue
        cfg = ctx.train_config(task, seed)
        run_id = _open_run(client, ctx, run, cfg, state)
        if state is not None:
            latest[name] = (_train_state(state), run_id)
        todo.append({"name": name, "index": index, "cfg": cfg, "run_id": run_id, "state": _train_state(state),
                     "done": False})
    if not todo:
        report({"prompts": len(members), "done_before": 1}, None)
        return finals

    def on_epoch_end(i: int, metrics: dict[str, Any], state: dict[str, Any]) -> None:
        m = todo[i]
        latest[m["name"]] = (state, m["run_id"])
        report({**metrics, "prompt": m["name"]}, dict(latest))  # the checkpoint first: see the module docstring
        tracking.log_metrics(client, m["run_id"], tracking.epoch_metrics(metrics), step=metrics["epoch"])

    def on_prompt_end(i: int, result) -> None:
        m = todo[i]
        # The whole group's size and this prompt's place in it, not the resumed remainder's.
        result.resolved.update(group_size=len(members), group_index=m["index"])
        finish_train_run(client, m["run_id"], result, ctx.logged_config(result.resolved))
        m["done"] = True
        latest.pop(m["name"], None)
        finals[m["name"]] = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and k != "seed"}

    try:
        train_group([m["cfg"] for m in todo], on_epoch_end=on_epoch_end, resume=[m["state"] for m in todo],
                    on_prompt_end=on_prompt_end)
    except BaseException:
        for m in todo:
            if not m["done"]:
                mark_failed(client, m["run_id"])
        raise
    report({"prompts": len(members), "done": len(finals)}, None)
    return finals


# ---------------------------------------------------------------------------------------------------------------
# the Tuner


def _trial_name(trial) -> str:
    if "group" in trial.config:  # cb-seed0+cb-seed1: its prompts' run names
        return "+".join(layout.train_run_name(t, s) for t, s in parse_group_key(trial.config["group"]))
    return layout.train_run_name(trial.config["task"], trial.config["seed"])


def _trial_dirname(trial) -> str:
    return f"{_trial_name(trial)}_{trial.trial_id}"


def train_phase(plan: Plan, opts: Options, ctx: StudyContext, storage: str, gpus: float) -> dict[str, int]:
    """One Tune trial per (task, seed), or per group of ``plan.group_size`` of them (``plan.groups()``, trained by
    ``run_group``) when that is above 1; or Tune's restore of them on ``--resume`` (the stored plan keeps its
    grouping). ``gpus``: the GPU fraction of each Tune trial (a group's, when grouped).

    Returns counts of trials ``done``, ``failed`` and ``interrupted`` (unfinished after fit, e.g. by Ctrl-C).
    """
    from ray import tune

    grouped = plan.group_size > 1
    trainable = tune.with_resources(tune.with_parameters(train_group_trial if grouped else train_trial, ctx=ctx),
                                    {"cpu": opts.cpus_per_trial, "gpu": gpus})
    if grouped:
        space = {"group": tune.grid_search([group_key(g) for g in plan.groups()])}
    else:
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


def tune_path(storage: str, study: str) -> str:
    """Where Tune keeps the study's trials: ``storage``/``study`` (a URI or a local path)."""
    return f"{storage}/{study}" if "://" in storage else str(Path(storage) / study)


def tune_state_exists(path: str) -> bool:
    """Whether ``path`` holds a Tune experiment that can be restored."""
    from ray import tune

    try:
        return tune.Tuner.can_restore(path)
    except Exception:  # an unreachable bucket is reported by Tune itself when it starts
        return False
