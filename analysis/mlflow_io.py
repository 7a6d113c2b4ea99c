"""The thin MLflow layer: a study's runs and artifacts in (docs/tracking.md), one ``analysis`` run out.

Artifacts are read as JSON and safetensors only; nothing downloaded from a tracking server is unpickled. Only
the files the contract names are downloaded, one by one.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tempfile
from pathlib import Path

from analysis.records import DELETED, EvalRun, PromptRun, RunStatus, Study, Trial
from ptray import layout
from ptray.errors import PtrayError
from ptray.study import store, tracking


def _check_uri(uri: str) -> None:
    """Fail at once, in one line, on a store that is not there (instead of MLflow creating an empty one, or
    retrying a dead server for minutes)."""
    if not store.store_exists(uri):
        raise PtrayError(f"no MLflow database or file store at {uri}; pass --tracking-uri with the study's store, "
                         f"e.g. sqlite:///path/to/mlflow.db")


def connect(tracking_uri: str | None = None):
    """An ``MlflowClient`` for ``tracking_uri`` (default: MLflow's own default / $MLFLOW_TRACKING_URI); a store
    MLflow cannot use is one ``PtrayError`` line (``store.open_store``), as in the sweep."""
    uri = store.resolve_tracking_uri(tracking_uri)
    _check_uri(uri)
    return store.open_store(uri), uri


def find_experiment(client, name: str):
    """The experiment named ``name``; an unknown name is a ``PtrayError`` that suggests the nearest one."""
    try:
        exp = client.get_experiment_by_name(name)
    except Exception as err:
        raise PtrayError(f"could not query the MLflow store: {type(err).__name__}: {str(err).splitlines()[0]}") \
            from None
    if exp is not None and exp.lifecycle_stage != "active":
        raise tracking.deleted_experiment_error(exp, store.client_uri(client))
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        hint = difflib.get_close_matches(name, names, n=1)
        raise PtrayError(f"no experiment named {name!r} in this MLflow store"
                         + (f"; did you mean {hint[0]!r}?" if hint else "")
                         + (f" (experiments: {', '.join(sorted(names))})" if names else " (it has no experiments)"))
    return exp


def _all_runs(client, experiment_id: str) -> list:
    return tracking.search_runs(client, experiment_id, order_by=["attributes.start_time ASC"])


def _deleted_runs(client, experiment_id: str) -> list:
    """The experiment's deleted runs (still in the store until ``mlflow gc``), all pages: a plan's run that was
    deleted is named as such, not as one that never ran."""
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], "", run_view_type=ViewType.DELETED_ONLY, max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _status(run, status: str | None = None) -> RunStatus:
    t = run.data.tags
    return RunStatus(t.get(layout.TAG_STUDY, ""), t.get(layout.TAG_KIND, ""), run.info.run_name or run.info.run_id,
                     status or run.info.status, t.get(layout.TAG_STOPPED_BY) or None)


def _key(run) -> tuple:
    """What identifies a run here: ``layout.run_key``, and for a train run also the prompt it started from
    (``ptray.init_from``: a SPoT study trains one target run per source) and its ``lr`` param (the trials of a
    search differ by it)."""
    t = run.data.tags
    key = layout.run_key(t)
    if t.get(layout.TAG_KIND) == layout.TRAIN:
        key += (t.get(layout.TAG_INIT_FROM), run.data.params.get("lr"))
    return key


def _stopped(run) -> bool:
    """A train run a Tune scheduler stopped early: KILLED with ``ptray.stopped_by`` (a search trial, kept)."""
    return run.info.status == layout.KILLED and bool(run.data.tags.get(layout.TAG_STOPPED_BY))


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def register_study_tasks(exp) -> None:
    """Register the user tasks (task files) every plan of the experiment stored, so a fresh process can read and
    evaluate them as the study's workers did (``ptray.data.tasks.register_declarations``).

    Raises:
        PtrayError: a stored declaration clashes with a task this process already knows under its name.
    """
    from ptray.data.tasks import register_declarations

    for key, value in (exp.tags or {}).items():
        if key.startswith(layout.PLAN_TAG_PREFIX):
            declarations = json.loads(value).get("task_declarations") or ()
            register_declarations(declarations, f"the stored plan {key!r}")


def stored_plans(exp) -> dict[str, dict]:
    """Every study's plan stored in the experiment (``ptray.plan.<study>`` tags), by study id; one that is not
    valid JSON is left out (the coverage section then says the study has no readable plan)."""
    plans = {}
    for key, value in (exp.tags or {}).items():
        if key.startswith(layout.PLAN_TAG_PREFIX):
            try:
                plans[key.removeprefix(layout.PLAN_TAG_PREFIX)] = json.loads(value)
            except ValueError:
                continue
    return plans


def _plan(exp) -> dict:
    """The study's plan stored as an experiment tag (``ptray.plan.<study>``), {} without one (or with several)."""
    plans = [v for k, v in (exp.tags or {}).items() if k.startswith(layout.PLAN_TAG_PREFIX)]
    try:
        return json.loads(plans[0]) if len(plans) == 1 else {}
    except ValueError:
        return {}


def _condition(tag: str | None, search: bool) -> tuple[str | None, str | None]:
    """(declared condition, search trial) of a run's ``ptray.condition`` tag: in a search the tag is the trial
    (``sample3``, ``random-sample3``) and the declared condition is the tag without its sample suffix."""
    if not tag:
        return None, None
    if not search:
        return tag, None
    if re.fullmatch(r"sample\d+", tag):
        return None, tag
    head, sep, tail = tag.rpartition("-sample")
    return (head, tag) if sep and tail.isdigit() else (tag, None)


def _latest(runs: list, notes: list[str]) -> list:
    """One run per key (``_key``): the latest (a resumed or re-run study repeats runs)."""
    keep: dict[tuple, object] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        key = _key(run)
        if key in keep:
            notes.append(f"run {keep[key].info.run_name or keep[key].info.run_id} is repeated; the later "
                         f"{run.info.run_id} is used")
        keep[key] = run
    return list(keep.values())


def _download(run, path: str, dst: Path, required: bool, tracking_uri: str) -> Path | None:
    """One artifact file of ``run`` into ``dst`` (keeping its sub-folder), straight from the run's artifact URI
    (``mlflow-artifacts:`` URIs resolve against ``tracking_uri``, the server that serves them)."""
    import mlflow

    run_id = run.info.run_id
    target = dst / Path(path).parent
    target.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{run.info.artifact_uri.rstrip('/')}/{path}",
                                                    dst_path=str(target), tracking_uri=tracking_uri)
    except Exception as err:
        if required:
            kind = run.data.tags.get(layout.TAG_KIND, "")
            raise PtrayError(f"{kind} run {run.info.run_name or run_id}: artifact {path!r} could not be read "
                             f"({type(err).__name__}); see docs/tracking.md for the files each run holds") from None
        return None
    return Path(local)


def _json(run, name: str, dst: Path, required: bool, tracking_uri: str) -> dict | list:
    local = _download(run, name, dst, required, tracking_uri)
    if local is None:
        return {}
    try:
        return json.loads(local.read_text())
    except (OSError, ValueError) as err:
        raise PtrayError(f"run {run.info.run_id}: {name} is not valid JSON ({err})") from None


def _int(value, what: str, run_id: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise PtrayError(f"run {run_id}: tag/field {what} should be an integer, got {value!r}") from None


def load_study(experiment: str, tracking_uri: str | None = None) -> tuple[Study, list[str]]:
    """Read every finished run of ``experiment``: (Study, notes about runs that were skipped)."""
    from ptray.lm.prompt import load_adapter

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file is noise here
    client, uri = connect(tracking_uri)
    exp = find_experiment(client, experiment)
    register_study_tasks(exp)
    prompts, evals, trials, notes, studies, runs = [], [], [], [], set(), []
    statuses = [_status(r, DELETED) for r in _deleted_runs(client, exp.experiment_id)
                if r.data.tags.get(layout.TAG_KIND) in (layout.TRAIN, *layout.EVAL_KINDS)]
    for run in _all_runs(client, exp.experiment_id):
        kind = run.data.tags.get(layout.TAG_KIND)
        if kind not in (layout.TRAIN, *layout.EVAL_KINDS):
            continue
        statuses.append(_status(run))
        if run.info.status != layout.FINISHED and not (kind == layout.TRAIN and _stopped(run)):
            notes.append(f"skipped {kind} run {run.info.run_name or run.info.run_id} ({run.info.status})")
            continue
        runs.append(run)
    runs = _latest(runs, notes)
    plan = _plan(exp)
    search = bool(plan.get("search")) or any(_stopped(r) for r in runs)
    if not any(r.data.tags.get(layout.TAG_KIND) == layout.TRAIN and r.info.status == layout.FINISHED for r in runs):
        raise PtrayError(f"experiment {experiment!r} has no finished train runs (runs tagged "
                         f"{layout.TAG_KIND}={layout.TRAIN}); nothing to analyse")
    with tempfile.TemporaryDirectory(prefix="ptray-analysis-") as tmp:
        for run in runs:
            tags = run.data.tags
            kind = tags[layout.TAG_KIND]
            run_id = run.info.run_id
            studies.add(tags.get(layout.TAG_STUDY, ""))
            dst = Path(tmp) / run_id
            condition, trial = _condition(tags.get(layout.TAG_CONDITION), search)
            if kind == layout.TRAIN and _stopped(run):
                trials.append(_stopped_trial(client, run, condition, trial))
            elif kind == layout.TRAIN:
                for name in layout.PROMPT_FILES:
                    _download(run, name, dst, required=True, tracking_uri=uri)
                prompt = load_adapter(dst / layout.PROMPT_DIR)
                config = _json(run, layout.CONFIG_FILE, dst, True, uri)
                metrics = _json(run, layout.METRICS_FILE, dst, False, uri)
                preds = _json(run, layout.PREDICTIONS_FILE, dst, False, uri)
                try:
                    history = _json(run, layout.HISTORY_FILE, dst, False, uri) or []
                except PtrayError:  # only the learning curves need it: the run is analysed without them
                    history = None
                if not isinstance(history, list) or not all(isinstance(h, dict) and "epoch" in h for h in history):
                    notes.append(f"train run {run.info.run_name or run_id}: {layout.HISTORY_FILE} is not a list of "
                                 f"epochs; left out of the learning curves")
                    history = []
                task = tags.get(layout.TAG_TASK) or config.get("task")
                seed = tags.get(layout.TAG_SEED, config.get("seed"))
                if not task:
                    raise PtrayError(f"train run {run_id} has no {layout.TAG_TASK} tag and no task in config.json")
                lr = _float(run.data.params.get("lr", config.get("lr")))
                prompt_run = PromptRun(run_id, str(task), _int(seed, "seed", run_id), prompt, config, metrics, preds,
                                       condition=condition, init_from=tags.get(layout.TAG_INIT_FROM) or None, lr=lr,
                                       trial=trial, history=history)
                prompts.append(prompt_run)
                trials.append(Trial(
                    run_id, prompt_run.task, prompt_run.seed, layout.FINISHED, lr, prompt_run.condition,
                    init_from=prompt_run.init_from, run_name=run.info.run_name or "",
                    metrics={"best_eval_loss": metrics.get("eval_loss"), "eval_loss": _last_eval_loss(run, metrics),
                             "best_epoch": metrics.get("best_epoch"), "epochs_run": metrics.get("epochs_run"),
                             "exact_match": metrics.get("exact_match"),
                             "rank_accuracy": metrics.get("rank_accuracy")}, trial=trial))
            else:
                metrics = _json(run, layout.METRICS_FILE, dst, True, uri)
                preds = _json(run, layout.PREDICTIONS_FILE, dst, False, uri)
                target = tags.get(layout.TAG_TARGET) or metrics.get("target")
                source = tags.get(layout.TAG_SOURCE, metrics.get("source"))
                seed = tags.get(layout.TAG_SEED, metrics.get("source_seed"))
                transfer = kind == layout.TRANSFER
                if transfer and (seed is None or not source or source == layout.NO_SOURCE):
                    raise PtrayError(f"transfer run {run_id} has no source task or seed")
                idx, em_correct, rank_correct = layout.prediction_lists(preds)
                evals.append(EvalRun(
                    run_id=run_id, kind=kind, target=str(target), source=str(source) if transfer else None,
                    source_seed=_int(seed, "seed", run_id) if transfer else None, metrics=metrics, idx=idx,
                    em_correct=em_correct, rank_correct=rank_correct,
                    condition=condition, trial=trial))
    study_tag = min(studies) if len(studies) == 1 else ",".join(sorted(s for s in studies if s))
    return Study(experiment, study_tag, prompts, evals, experiment_id=exp.experiment_id, trials=trials,
                 search=dict(plan.get("search") or ({"stopped": True} if search else {})),
                 plans=stored_plans(exp), runs=statuses), notes


def _last_eval_loss(run, metrics: dict) -> float | None:
    """A train run's last epoch's eval loss: the latest value of its per-epoch ``eval_loss`` (the best epoch's
    from metrics.json when the run logged no history)."""
    return _float(run.data.metrics.get(layout.HISTORY_KEY, metrics.get("eval_loss")))


def _stopped_trial(client, run, condition: str | None, trial: str | None) -> Trial:
    """A scheduler-stopped train run as a Trial, from its tags, params and per-epoch metrics (no artifacts are
    needed: a stopped trial may have none)."""
    tags, m = run.data.tags, run.data.metrics
    run_id = run.info.run_id
    task = tags.get(layout.TAG_TASK) or run.data.params.get("task")
    if not task:
        raise PtrayError(f"train run {run_id} has no {layout.TAG_TASK} tag and no task param")
    history = client.get_metric_history(run_id, layout.HISTORY_KEY)
    losses = [h.value for h in history]
    return Trial(run_id, str(task), _int(tags.get(layout.TAG_SEED, run.data.params.get("seed")), "seed", run_id),
                 layout.KILLED, _float(run.data.params.get("lr")), condition,
                 tags.get(layout.TAG_STOPPED_BY), tags.get(layout.TAG_INIT_FROM) or None, run.info.run_name or "",
                 {"best_eval_loss": _float(m.get("best_eval_loss", min(losses) if losses else None)),
                  "eval_loss": _float(m.get(layout.HISTORY_KEY)),
                  "best_epoch": _float(m.get("best_epoch")), "epochs_run": len({h.step for h in history}),
                  "exact_match": None, "rank_accuracy": None}, trial=trial)


def log_analysis(experiment_id: str, study_name: str, out_dir: Path, tracking_uri: str | None,
                 metrics: dict[str, float]) -> str:
    """Create the experiment's ``analysis`` run holding every file of ``out_dir`` as artifacts and ``metrics``
    (NaN ones left out); returns its id. A failure part way marks the run FAILED where the store still answers.

    Raises:
        PtrayError: the store cannot be reached or used before the run exists (``connect``).
        Exception: MLflow's own error when the store fails while the run is logged.
    """
    client, _ = connect(tracking_uri)
    run = tracking.create_run(client, experiment_id, layout.ANALYSIS_RUN_NAME,
                              layout.run_tags(study_name, layout.ANALYSIS))
    run_id = run.info.run_id
    try:
        client.log_artifacts(run_id, str(out_dir))
        for key, value in metrics.items():
            if value is not None and not math.isnan(value):  # NaN is not a metric
                client.log_metric(run_id, key, float(value))
    except Exception:
        try:
            client.set_terminated(run_id, layout.FAILED)
        except Exception:  # noqa: BLE001 - the store that failed the upload may be gone: the first error counts
            pass
        raise
    client.set_terminated(run_id, layout.FINISHED)
    return run_id
