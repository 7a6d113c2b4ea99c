"""What a study logs into MLflow: experiments, the stored plan, paged run searches, idempotent run lookup, a
finished run's one writer and a run marked failed; the run layout of docs/tracking.md. Where the store is and
whether it answers is ``ptray.study.store``'s.

A study's runs are found again by their tags, not by ids kept somewhere else: that is what makes ``--resume`` and a
retried trial land in the run they already started instead of creating a duplicate.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ptray import layout
from ptray.errors import PtrayError
from ptray.study.store import artifact_place, artifact_root, client_uri, is_server

log = logging.getLogger("ptray")


def get_or_create_experiment(mlflow_client, name: str) -> str:
    """The experiment's id; created when missing. A deleted experiment of that name is an error, not a surprise."""
    from mlflow.exceptions import MlflowException

    exp = mlflow_client.get_experiment_by_name(name)
    if exp is None:
        try:
            return _create_experiment(mlflow_client, name)
        except MlflowException:  # created meanwhile by another process
            exp = mlflow_client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        raise deleted_experiment_error(exp, client_uri(mlflow_client))
    return exp.experiment_id


def _create_experiment(mlflow_client, name: str) -> str:
    """Create the experiment ``name``; in a SQLite store with its artifacts under ``store.artifact_root`` (beside
    the database), ``<root>/<experiment id>``. Returns its id."""
    uri = client_uri(mlflow_client)
    root = artifact_root(uri)
    if root is None:
        return mlflow_client.create_experiment(name)
    # The store MLflow's client opens for this URI, given an artifact root, as ``mlflow server
    # --default-artifact-root`` gives one: the experiment's folder is then named by its id, known only once created.
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    return str(SqlAlchemyStore(uri, root.absolute().as_uri()).create_experiment(name))


def artifact_location(mlflow_client, experiment_id: str) -> str:
    """Where the experiment's runs keep their artifacts: a local folder's path, else its URI (a server's)."""
    return artifact_place(mlflow_client.get_experiment(experiment_id).artifact_location)


def deleted_experiment_error(exp, uri: str, study: str | None = None) -> PtrayError:
    """The one line for a deleted experiment: that it was deleted, how to restore it and how to purge it."""
    eid = exp.experiment_id
    what = f"study {study!r} is in MLflow experiment {exp.name!r}, which" if study else \
        f"MLflow experiment {exp.name!r}"
    if is_server(uri):
        restore = f"MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id {eid}"
        purge = f"`mlflow gc --backend-store-uri <the server's database> --experiment-ids {eid}` on the server"
    else:
        restore = f"MLFLOW_TRACKING_URI={shlex.quote(uri)} mlflow experiments restore --experiment-id {eid}"
        purge = f"`mlflow gc --backend-store-uri {shlex.quote(uri)} --experiment-ids {eid}`"
    return PtrayError(f"{what} (id {eid}) at {uri} was deleted; restore it with `{restore}`, or purge it for good "
                      f"with {purge} and start anew (or pass another --experiment)")


def check_experiment(mlflow_client, name: str, uri: str, study: str | None = None) -> None:
    """Refuse a deleted experiment named ``name`` (``deleted_experiment_error``), before anything starts."""
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage != "active":
        raise deleted_experiment_error(exp, uri, study)


def read_plan(mlflow_client, experiment_name: str, study: str) -> dict | None:
    """The plan (JSON) stored for ``study`` in the experiment, or None (no such experiment, deleted, or no plan)."""
    exp = mlflow_client.get_experiment_by_name(experiment_name)
    if exp is None or exp.lifecycle_stage != "active":
        return None
    raw = exp.tags.get(layout.PLAN_TAG_PREFIX + study)
    return json.loads(raw) if raw else None


def write_plan(mlflow_client, experiment_id: str, study: str, plan: dict) -> None:
    """Store ``plan`` (JSON) as the experiment tag ``ptray.plan.<study>``."""
    mlflow_client.set_experiment_tag(experiment_id, layout.PLAN_TAG_PREFIX + study, json.dumps(plan, sort_keys=True))


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def search_study_runs(mlflow_client, experiment_id: str, study: str, kind: str | None = None,
                      name: str | None = None, extra: str = "") -> list:
    """Every active run of ``study`` (optionally of one kind / run name), all pages."""
    clauses = [f"tags.`{layout.TAG_STUDY}` = {_quote(study)}"]
    if kind:
        clauses.append(f"tags.`{layout.TAG_KIND}` = {_quote(kind)}")
    if name:
        clauses.append(f"attributes.run_name = {_quote(name)}")
    if extra:
        clauses.append(extra)
    return search_runs(mlflow_client, experiment_id, " and ".join(clauses))


def search_runs(mlflow_client, experiment_id: str, filter_string: str = "", order_by: list[str] | None = None) -> list:
    """Every active run of the experiment matching ``filter_string`` (MLflow's search syntax), all pages."""
    runs, token = [], None
    while True:
        page = mlflow_client.search_runs([experiment_id], filter_string, max_results=1000, order_by=order_by,
                                         page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_run(mlflow_client, experiment_id: str, study: str, name: str):
    """The active run named ``name`` in ``study`` (the oldest, should a race ever have made two), or None."""
    runs = search_study_runs(mlflow_client, experiment_id, study, name=name)
    return min(runs, key=lambda r: r.info.start_time) if runs else None


def create_run(mlflow_client, experiment_id: str, name: str, tags: dict[str, str]):
    """A new RUNNING run named ``name`` with ``tags`` (``layout.run_tags``)."""
    return mlflow_client.create_run(experiment_id, run_name=name, tags=tags)


def log_params_once(mlflow_client, run_id: str, params: dict[str, Any]) -> None:
    """Log params not yet on the run. MLflow refuses to change a param, and a trial resumed on another node (say a
    CPU one) must not fail on that; the first value stays."""
    from mlflow.entities import Param

    have = mlflow_client.get_run(run_id).data.params
    todo = [Param(k, _param_value(v)) for k, v in params.items() if k not in have]
    for i in range(0, len(todo), 100):  # MLflow's batch limit for params
        mlflow_client.log_batch(run_id, params=todo[i: i + 100])


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:6000]  # MLflow's limit for a param value


def log_metrics(mlflow_client, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
    """Log the numeric entries of ``metrics`` at ``step`` in one request (atomic on the server)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if batch:
        mlflow_client.log_batch(run_id, metrics=batch)


def epoch_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The per-epoch metrics to log for one row of ``train``'s history (the epoch is the step)."""
    return {k: v for k, v in row.items() if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def logged_epochs(mlflow_client, run_id: str) -> list[int]:
    """The epochs (steps) a train run has logged, sorted."""
    return sorted(m.step for m in mlflow_client.get_metric_history(run_id, layout.HISTORY_KEY))


def sync_history(mlflow_client, run, history: list[dict[str, Any]]) -> str:
    """Make ``run``'s per-epoch metrics exactly ``history`` (a resumed trial's checkpointed epochs); return the run
    id to continue logging in.

    A trial logs an epoch to MLflow only after its checkpoint is saved, so a resumed run normally lacks at most the
    last checkpointed epoch: it is logged here, and the history stays contiguous. If MLflow holds epochs that the
    checkpoint does not (the driver was killed before Tune recorded the newest checkpoint), those points cannot be
    deleted from a metric's history: the run is replaced by a new one with the same name, tags and params and the
    checkpointed history, and the old one is deleted, so that the study never shows a duplicated epoch.
    """
    run_id = run.info.run_id
    have = logged_epochs(mlflow_client, run_id)
    want = [row["epoch"] for row in history]
    if have == want[: len(have)]:
        for row in history[len(have):]:
            log_metrics(mlflow_client, run_id, epoch_metrics(row), step=row["epoch"])
        return run_id
    from mlflow.entities import Param

    new = mlflow_client.create_run(run.info.experiment_id, run_name=run.info.run_name,
                                   tags={k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")})
    params = [Param(k, v) for k, v in run.data.params.items()]
    for i in range(0, len(params), 100):
        mlflow_client.log_batch(new.info.run_id, params=params[i: i + 100])
    for row in history:
        log_metrics(mlflow_client, new.info.run_id, epoch_metrics(row), step=row["epoch"])
    mlflow_client.set_tag(new.info.run_id, layout.TAG_REPLACES, run_id)
    retire(mlflow_client, run)
    return new.info.run_id


def retire(mlflow_client, run) -> None:
    """Delete a run that another replaces; one still RUNNING is finished as KILLED first, so that the deleted run
    does not read as running forever."""
    if run.info.status == layout.RUNNING:
        mlflow_client.set_terminated(run.info.run_id, status=layout.KILLED)
    mlflow_client.delete_run(run.info.run_id)


@contextmanager
def finishing(mlflow_client, run_id: str) -> Iterator[None]:
    """Log into ``run_id`` inside the block; then mark the run FINISHED, or FAILED when the block raised (the error
    is raised again).

    Only FINISHED runs are complete (docs/tracking.md): a run whose logging broke off must not pass for one.
    """
    try:
        yield
    except BaseException:
        mark_failed(mlflow_client, run_id)
        raise
    mlflow_client.set_terminated(run_id, status=layout.FINISHED)


def mark_failed(mlflow_client, run_id: str) -> None:
    """Mark the run FAILED, if the store still answers.

    The error that got us here is the one to report, not this one: a store error here is only logged.
    """
    try:
        mlflow_client.set_terminated(run_id, status=layout.FAILED)
    except Exception as err:  # noqa: BLE001 - any store error; the original exception follows
        log.warning("could not mark MLflow run %s FAILED: %s", run_id, err)


def final_metrics(run) -> dict[str, float]:
    """A finished train run's final metrics, without the prefix."""
    n = len(layout.FINAL_PREFIX)
    return {k[n:]: v for k, v in run.data.metrics.items() if k.startswith(layout.FINAL_PREFIX)}


def replace_unfinished(mlflow_client, experiment_id: str, study: str, name: str) -> Any:
    """The finished run named ``name``, or None after deleting any unfinished one (a crashed evaluation's run, which
    would otherwise stay as a duplicate beside its retry)."""
    found = None
    for run in search_study_runs(mlflow_client, experiment_id, study, name=name):
        if run.info.status == layout.FINISHED and found is None:
            found = run
        else:
            retire(mlflow_client, run)
    return found



def log_finished_run(mlflow_client, run_id: str, params: dict[str, Any], metrics: dict[str, Any],
                     artifacts: str | Path) -> None:
    """Log what a finished run leaves, then mark it FINISHED: ``params`` once, ``metrics`` (``layout.logged_metrics``
    of its ``metrics.json``), and every file of the folder ``artifacts``. The one writer of a finished run: the Ray
    trial, the transfer grid and ``ptray publish`` (a local study's run folders) all log through it. A failure marks
    the run FAILED and is raised again (``finishing``)."""
    with finishing(mlflow_client, run_id):
        log_params_once(mlflow_client, run_id, params)
        log_metrics(mlflow_client, run_id, metrics)
        mlflow_client.log_artifacts(run_id, str(artifacts))
