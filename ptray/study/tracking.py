"""MLflow helpers: the run layout of docs/tracking.md, idempotent run lookup and a fast reachability check.

Everything goes through an explicit ``MlflowClient(tracking_uri)``, never MLflow's global "active run", so a Ray
worker that runs many trials one after another (or a trial resumed on another node) never logs into a stale run.

A study's runs are found again by their tags, not by ids kept somewhere else: that is what makes ``--resume`` and a
retried trial land in the run they already started instead of creating a duplicate.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ptray import layout
from ptray.errors import PtrayError

log = logging.getLogger("ptray")


def default_tracking_uri() -> str:
    """The embedded store: a SQLite file in the working directory (MLflow's own default location)."""
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else the local SQLite store; local paths made absolute.

    Trials run in other processes and working directories (Ray changes into each trial's folder), so a relative
    ``sqlite:///mlflow.db`` would name a different file in every trial.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if not path or path == ":memory:":
            raise PtrayError(f"tracking URI {uri!r} names no database file; use sqlite:///PATH/mlflow.db")
        return f"sqlite:///{Path(path).expanduser().resolve()}"
    if parsed.scheme == "file":
        return Path(parsed.path).expanduser().resolve().as_uri()
    if parsed.scheme == "":
        return Path(uri).expanduser().resolve().as_uri()
    return uri.rstrip("/") if parsed.scheme in ("http", "https") else uri


def store_exists(uri: str) -> bool:
    """False only for a local store whose file or folder is missing (a server or database is assumed to exist)."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        return Path(uri[len("sqlite:///"):]).is_file()
    if parsed.scheme == "file":
        return Path(parsed.path).exists()
    return True


def is_server(uri: str) -> bool:
    """Whether ``uri`` is a tracking server (http or https)."""
    return urlparse(uri).scheme in ("http", "https")


def is_local_store(uri: str) -> bool:
    """A store that lives on this machine's disk (SQLite file or folder): invisible to other machines."""
    return urlparse(uri).scheme in ("sqlite", "file", "")


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """Fail within ``timeout`` seconds, with one clear message, when the tracking store cannot be used.

    Without this, MLflow's HTTP client retries for minutes, and every trial on every node would fail the same way.
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        _check_server(uri, timeout)
    elif parsed.scheme in ("sqlite", "file"):
        path = Path(uri[len("sqlite:///"):]) if parsed.scheme == "sqlite" else Path(parsed.path)
        folder = path.parent if parsed.scheme == "sqlite" else path
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise PtrayError(f"cannot create the MLflow store {uri!r}: {str(folder)!r} is a file, not a folder")
        if not os.access(folder, os.W_OK):
            raise PtrayError(f"cannot write the MLflow store {uri!r}: {str(folder)!r} is not writable")
        if parsed.scheme == "sqlite":
            path.parent.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its folder
    # Other schemes (databricks, postgresql, ...) are checked by MLflow itself on first use.


def _check_server(uri: str, timeout: float) -> None:
    hint = "start it, or pass another --tracking-uri (or MLFLOW_TRACKING_URI)"
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as err:
        raise PtrayError(f"the MLflow tracking server at {uri} answered /health with HTTP {err.code}; "
                         f"is it an MLflow server? {hint}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise PtrayError(f"cannot reach the MLflow tracking server at {uri} ({reason}); {hint}") from None
    try:
        url = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as err:
        raise PtrayError(f"the MLflow tracking server at {uri} refused a search with HTTP {err.code} "
                         f"(authentication? set MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN)") from None
    except (urllib.error.URLError, OSError) as err:
        raise PtrayError(f"the MLflow tracking server at {uri} did not answer a search within {timeout:.0f} s "
                         f"({getattr(err, 'reason', err)})") from None


def client(uri: str):
    """An ``MlflowClient`` bound to ``uri`` (never MLflow's global state)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


# ---------------------------------------------------------------------------------------------------------------
# experiments and runs


def get_or_create_experiment(mlflow_client, name: str) -> str:
    """The experiment's id; created when missing. A deleted experiment of that name is an error, not a surprise."""
    from mlflow.exceptions import MlflowException

    exp = mlflow_client.get_experiment_by_name(name)
    if exp is None:
        try:
            return mlflow_client.create_experiment(name)
        except MlflowException:  # created meanwhile by another process
            exp = mlflow_client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        raise PtrayError(f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore "
                         f"--experiment-id {exp.experiment_id}) or choose another --experiment")
    return exp.experiment_id


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
    mlflow_client.delete_run(run_id)
    return new.info.run_id


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
            mlflow_client.delete_run(run.info.run_id)
    return found


def ui_command(uri: str) -> str:
    """How to open the MLflow UI on this store."""
    if is_server(uri):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"

