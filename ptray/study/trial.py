"""One Tune trial trains a group of (task, seed) prompts on one frozen model, each prompt into its own MLflow run;
a single prompt is a group of one. ``ptray.study.tuner`` runs the study's grid of them.

``train_trial`` is the thin Tune function (config -> ``run_group`` -> ``tune.report`` with a checkpoint of
``ptray.study.checkpoints``); ``run_group`` holds the logic without Ray, so tests drive it with a fake ``report``
(``run_training``: the same for one prompt). Both are safe to run again: a trial finds its runs by name (or through
its checkpoint) and never duplicates them.

Order of writes, which is what keeps a resumed run's history contiguous: each epoch's checkpoint is persisted
(``tune.report``) before the epoch is logged to MLflow; a resumed trial logs what its checkpoint holds and MLflow
lacks (``tracking.sync_history``), then continues with the next epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ptray import layout
from ptray.config import TrainConfig, expand_init_source
from ptray.errors import PtrayError
from ptray.files import name_problem, write_json
from ptray.study import tracking
from ptray.study.checkpoints import States, load_trial_checkpoint, save_trial_checkpoint
from ptray.study.context import StudyContext, quiet, torch_threads

log = logging.getLogger("ptray")

# Config fields that ``train`` resolves (None -> the init text's length or the optimizer's lr, auto -> cuda/bf16,
# ...): logged only once resolved, since MLflow never changes a param after it is set.
RESOLVED_LATER = ("init_text", "num_tokens", "device", "precision", "attention", "lr")

# report(metrics, states): persist a trial checkpoint of ``states`` (None: none) and hand ``metrics`` to Tune.
GroupReport = Callable[[dict[str, Any], "States | None"], None]
# report(metrics, state, run_id): the same for a trial of one prompt, its state alone (``run_training``).
Report = Callable[[dict[str, Any], "dict[str, Any] | None", str], None]
# A trial's condition (its member's third element) -> the TrainConfig overrides it trains with.
Conditions = Mapping[str, Mapping[str, Any]]


# ---------------------------------------------------------------------------------------------------------------
# the trial's config


def group_key(members) -> str:
    """A group's (task, seed) or (task, seed, condition) prompts as the Tune config value: ``"cb:0,cb:1"``,
    ``"cb:0:random,cb:1:random"`` (a string: Tune would try to resolve nested lists as search spaces)."""
    return ",".join(":".join(map(str, member)) for member in members)


def parse_group_key(key: str) -> list[tuple]:
    """Inverse of ``group_key``."""
    return [(parts[0], int(parts[1]), *parts[2:]) for parts in (part.split(":") for part in key.split(","))]


def trial_members(config: dict[str, Any]) -> list[tuple]:
    """The prompts of a trial's config: ``{"group": group_key}``, or ``{"task", "seed"}`` (and ``"condition"`` in
    a study with conditions or a search) for one."""
    if "group" in config:
        return parse_group_key(config["group"])
    return [(config["task"], int(config["seed"]), *([config["condition"]] if config.get("condition") else []))]


def sampled(config: dict[str, Any]) -> dict[str, Any]:
    """A searched trial's sampled ``TrainConfig`` values (Tune's search space fills them in the config)."""
    return {k: v for k, v in config.items() if k in _TRAIN_FIELDS}


_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"task", "seed"}


# ---------------------------------------------------------------------------------------------------------------
# the Tune function


def train_trial(config: dict[str, Any], ctx: StudyContext, conditions: Conditions | None = None) -> None:
    """Tune function: train the trial's prompts (``trial_members``) with ``run_group``, resuming from Tune's
    checkpoint if any."""
    quiet()
    names = [layout.train_run_name(*member) for member in trial_members(config)]
    run_group(config, ctx, _tune_resume(lambda folder: load_trial_checkpoint(folder, names)), _tune_report,
              conditions)


def train_group_trial(config: dict[str, Any], ctx: StudyContext, conditions: Conditions | None = None) -> None:
    """``train_trial`` under the name grouped studies were saved with in Tune (``ptray.study.tuner.train_phase``)."""
    train_trial(config, ctx, conditions)


def _tune_resume(load: Callable[[str], Any]) -> Any:
    """What ``load`` reads from the trial's Tune checkpoint folder, or None when the trial starts fresh."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return load(folder)


def _tune_report(metrics: dict[str, Any], states: States | None) -> None:
    from ray import tune

    if states is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="ptray-ckpt-") as folder:
        save_trial_checkpoint(folder, states)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))  # persisted before it returns


# ---------------------------------------------------------------------------------------------------------------
# the trial without Ray


def run_group(config: dict[str, Any], ctx: StudyContext, resume: dict[str, dict[str, Any]] | None,
              report: GroupReport, conditions: Conditions | None = None) -> dict[str, dict[str, Any]]:
    """Train a trial's prompts (``trial_members(config)``) together with ``train_group``, each into its own MLflow
    run; return each prompt's final metrics by run name.

    ``resume`` (``load_trial_checkpoint``) holds the prompts' last checkpointed epochs. Every epoch's report carries
    a checkpoint of the latest state of every prompt still training, written before that epoch reaches MLflow. A
    prompt that leaves the group (early stopping, last epoch) has its run finished at once; one whose run is
    already FINISHED (the trial completed but Tune never heard of it, e.g. the driver was killed) is not trained
    again. The runs of a ``{"group": ...}`` config also get the params ``group_size`` and ``group_index``.
    A prompt with a condition (``(task, seed, condition)``) trains with ``conditions[condition]``'s overrides and a
    searched trial with its sampled values (``sampled(config)``); its run is tagged with the condition. It runs on
    ``ctx.threads`` torch CPU threads (``torch_threads``), the count every run records.
    """
    with torch_threads(ctx.threads):
        return _run_group(config, ctx, resume, report, conditions)


def _run_group(config: dict[str, Any], ctx: StudyContext, resume: dict[str, dict[str, Any]] | None,
               report: GroupReport, conditions: Conditions | None = None) -> dict[str, dict[str, Any]]:
    from ptray.training.loop import train_group

    ctx.register_tasks()  # the study's user tasks, before any task is looked up
    members = trial_members(config)
    grouped, searched = "group" in config, bool(sampled(config))
    resume = resume or {}
    client = ctx.client()
    finals: dict[str, dict[str, Any]] = {}
    latest: States = {}  # what the trial's checkpoint holds
    todo: list[dict[str, Any]] = []  # the prompts to train: name, index in the group, cfg, run id, resume state
    sources = tempfile.TemporaryDirectory(prefix="ptray-source-")  # SPoT source prompts, read at the group's setup
    for index, (task, seed, *condition) in enumerate(members):
        condition = condition[0] if condition else None
        name = layout.train_run_name(task, seed, condition)
        state = resume.get(name)
        run = _train_run(client, ctx, name, task, seed, state, condition)
        if run.info.status == layout.FINISHED:
            finals[name] = tracking.final_metrics(run)
            log.info("%s already finished in MLflow run %s; not training again", name, run.info.run_id)
            continue
        cfg = condition_config(ctx.train_config(task, seed), (conditions or {}).get(condition, {}), sampled(config))
        run_id = _open_run(client, ctx, run, cfg, state)
        if searched:  # the sampled values at once: a run its scheduler stops still says what it tried
            tracking.log_params_once(client, run_id, sampled(config))
        init_from = cfg.init_source
        cfg = resolve_init_source(client, ctx, cfg, Path(sources.name) / name)
        if init_from is not None:
            client.set_tag(run_id, layout.TAG_INIT_FROM, init_from)
        if state is not None:
            latest[name] = (_train_state(state), run_id)
        todo.append({"name": name, "index": index, "cfg": cfg, "run_id": run_id, "state": _train_state(state),
                     "done": False, "init_source": init_from})
    if not todo:
        report({**_one(finals), "prompts": len(members), "done_before": 1}, None)
        return finals

    def on_epoch_end(i: int, metrics: dict[str, Any], state: dict[str, Any]) -> None:
        m = todo[i]
        latest[m["name"]] = (state, m["run_id"])
        try:
            report({**metrics, "prompt": m["name"]}, dict(latest))  # the checkpoint first: see the module docstring
        except SystemExit as stop:  # Tune stopped the trial (its checkpoint holds this epoch)
            if searched and _stopped_by_tune(stop):  # a scheduler's stop: the run's history ends with this epoch
                tracking.log_metrics(client, m["run_id"], tracking.epoch_metrics(metrics), step=metrics["epoch"])
            raise
        tracking.log_metrics(client, m["run_id"], tracking.epoch_metrics(metrics), step=metrics["epoch"])

    def on_prompt_end(i: int, result) -> None:
        m = todo[i]
        if grouped:  # the whole group's size and this prompt's place in it, not the resumed remainder's
            result.resolved.update(group_size=len(members), group_index=m["index"])
        else:  # a single trial's run has no group, as ``train`` returns it (docs/tracking.md)
            for key in ("group_size", "group_index"):
                result.resolved.pop(key, None)
        if m["init_source"] is not None:  # as the study names it (a run name), not the node's downloaded copy
            result.resolved["init_source"] = m["init_source"]
        finish_train_run(client, m["run_id"], result, ctx.logged_config(result.resolved))
        m["done"] = True
        latest.pop(m["name"], None)
        finals[m["name"]] = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and k != "seed"}

    try:
        train_group([m["cfg"] for m in todo], on_epoch_end=on_epoch_end, resume=[m["state"] for m in todo],
                    on_prompt_end=on_prompt_end)
    except BaseException as err:
        # a searched trial that Tune stopped keeps its run RUNNING: the study marks it KILLED, tagged with the
        # scheduler that stopped it (ptray.study.tuner.finish_stopped), or resumes it if the study was interrupted
        if not (searched and isinstance(err, SystemExit) and _stopped_by_tune(err)):
            for m in todo:
                if not m["done"]:
                    tracking.mark_failed(client, m["run_id"])
        raise
    finally:
        sources.cleanup()
    report({**_one(finals), "prompts": len(members), "done": len(finals)}, None)
    return finals


def _one(finals: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A one-prompt trial's final metrics, which its last report shows Tune (a group's would collide)."""
    return next(iter(finals.values())) if len(finals) == 1 else {}


def run_training(config: dict[str, Any], ctx: StudyContext, resume: dict[str, Any] | None,
                 report: Report) -> dict[str, Any]:
    """Train one prompt (``config``: ``task``, ``seed``) into its MLflow run as ``run_group``'s group of one; return
    its final metrics.

    ``resume`` is the prompt's checkpointed state (``ptray.study.checkpoints.load_checkpoint``); ``report`` gets the
    prompt's state alone, and the run id (empty in the reports without a state, which need none).
    """
    name = layout.train_run_name(config["task"], int(config["seed"]))

    def report_one(metrics: dict[str, Any], states: States | None) -> None:
        state, run_id = states[name] if states else (None, "")
        report(metrics, state, run_id)

    finals = run_group({"task": config["task"], "seed": config["seed"]}, ctx,
                       {name: resume} if resume is not None else None, report_one)
    return finals[name]


# ---------------------------------------------------------------------------------------------------------------
# a prompt's MLflow run


def _stopped_by_tune(stop: SystemExit) -> bool:
    """Whether ``tune.report`` raised ``stop`` because Tune stopped the trial (it exits the training thread with 0)."""
    return stop.code in (0, None)


def condition_config(cfg: TrainConfig, overrides: Mapping[str, Any], values: Mapping[str, Any]) -> TrainConfig:
    """A trial's config with its condition's ``overrides`` and its sampled ``values`` (an init_source's ``{seed}``
    is the trial's seed)."""
    if not overrides and not values:
        return cfg
    cfg = dataclasses.replace(cfg, **overrides, **values)
    return dataclasses.replace(cfg, init_source=expand_init_source(cfg.init_source, cfg.seed))


def _train_run(client, ctx: StudyContext, name: str, task: str, seed: int, resume: dict[str, Any] | None,
               condition: str | None = None):
    """The prompt's MLflow run: the checkpoint's, else the one of that name in the study, else a new one."""
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
        run = tracking.create_run(client, ctx.experiment_id, name,
                                  layout.run_tags(ctx.study, layout.TRAIN, task, seed, condition=condition))
    return run


def source_run_name(init_source: str) -> tuple[str | None, str]:
    """``(study, run name)`` of an init_source that names a train run: ``STUDY/RUN`` (``spot-sources/rte-seed0``, a
    run of another study of the experiment) or ``RUN`` (study None: the trial's own study, else the one other study
    of the experiment that has it). A study id and a run name hold no ``/`` (``ptray.files.name_problem``), so the
    last ``/`` splits them."""
    study, sep, name = init_source.rpartition("/")
    return (study, name) if sep and not name_problem(study) and not name_problem(name) else (None, init_source)


def resolve_init_source(client, ctx: StudyContext, cfg, folder: Path):
    """``cfg`` ready to train on this node: an init_source that names a train run (init 'prompt', SPoT), replaced by
    that run's prompt adapter, downloaded into ``folder``; a folder as it is.

    A train run is named ``STUDY/RUN`` (a run of that study of the experiment: what ``sweeps/spot.py``'s second
    phase gives, its own first phase's study id) or ``RUN`` (``rte-seed0``: of the trial's study, else of the one
    other study of the experiment that has it).

    Raises:
        PtrayError: the source is neither a folder nor a FINISHED train run of the study named; or a bare ``RUN``
            that several other studies of the experiment hold (name one as ``STUDY/RUN``).
    """
    import dataclasses

    if cfg.init_source is None or Path(cfg.init_source).expanduser().is_dir():
        return cfg
    study, name = source_run_name(cfg.init_source)
    run = tracking.find_run(client, ctx.experiment_id, study or ctx.study, name)
    if run is None and study is None:  # another study of the experiment, when only one has it
        others = [r for r in tracking.search_runs(client, ctx.experiment_id, f"attributes.run_name = '{name}'")
                  if r.data.tags.get(layout.TAG_KIND) == layout.TRAIN and r.info.status == layout.FINISHED]
        studies = sorted({r.data.tags.get(layout.TAG_STUDY) for r in others})
        if len(studies) > 1:
            raise PtrayError(f"init source {cfg.init_source!r} names finished train runs of several studies of the "
                             f"experiment ({', '.join(studies)}); name one as STUDY/RUN (e.g. {studies[-1]}/{name}), "
                             f"or give an adapter folder")
        run = others[0] if others else None
    if run is None or run.info.status != layout.FINISHED or run.data.tags.get(layout.TAG_KIND) != layout.TRAIN:
        state = "not a train run" if run is None else f"a {run.data.tags.get(layout.TAG_KIND)} run, {run.info.status}"
        where = f"study {study!r} of the experiment" if study else f"study {ctx.study!r} or its experiment"
        raise PtrayError(f"init source {cfg.init_source!r} of {cfg.task} seed {cfg.seed} is neither a folder nor a "
                         f"finished train run of {where} ({state}); train the source prompt first")
    from mlflow.artifacts import download_artifacts

    folder.mkdir(parents=True, exist_ok=True)
    local = download_artifacts(run_id=run.info.run_id, artifact_path=layout.PROMPT_DIR, dst_path=str(folder),
                               tracking_uri=ctx.tracking_uri)
    return dataclasses.replace(cfg, init_source=str(local))


def _train_state(resume: dict[str, Any] | None) -> dict[str, Any] | None:
    """A checkpointed state as ``train_group`` resumes from it: without the run id."""
    if resume is None:
        return None
    return {k: v for k, v in resume.items() if k != "run_id"}


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


def _ray_node_id() -> str:
    """The Ray node this process runs on ("" outside Ray): which node a run was last on, for people and tests."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except ImportError:
        return ""


def finish_train_run(client, run_id: str, result, config: dict[str, Any]) -> None:
    """Log a finished training into its run: the resolved ``config`` as params (and ``config.json``), the final
    metrics (prefixed ``final_``), ``save_run``'s files as artifacts; then mark the run FINISHED.

    ``result`` is ``train``'s ``TrainResult``. A failure marks the run FAILED and is raised again
    (``tracking.finishing``).
    """
    from ptray.training.run_folder import save_run

    with tempfile.TemporaryDirectory(prefix="ptray-run-") as tmp:
        try:
            out = save_run(result, Path(tmp) / "run")
            write_json(out / layout.CONFIG_FILE, config)
        except BaseException:
            tracking.mark_failed(client, run_id)
            raise
        # Resolved values (n tokens, init text, device, precision, code version) are known only now. The same
        # writer logs a local study's run folders (ptray publish).
        tracking.log_finished_run(client, run_id, config, layout.logged_metrics(layout.TRAIN, result.metrics), out)
