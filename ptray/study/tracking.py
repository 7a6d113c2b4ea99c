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
import shlex
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from ptray import layout
from ptray.errors import PtrayError

log = logging.getLogger("ptray")


def default_tracking_uri() -> str:
    """The embedded store: a SQLite file in the working directory (MLflow's own default location)."""
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else the local SQLite store; local paths made absolute.

    Trials run in other processes and working directories (Ray changes into each trial's folder), so a relative
    ``sqlite:///mlflow.db`` would name a different file in every trial. A local store's path is read the way MLflow
    reads it (``local_path``) and written back with the libraries' own helpers, so that a path with spaces or ``%``
    names the same folder when the store is written, on ``--resume`` and in the analysis.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = local_path(uri) if uri.startswith("sqlite:///") else None
        if path is None or str(path) in ("", ".", ":memory:"):
            raise PtrayError(f"tracking URI {uri!r} names no database file; use sqlite:///PATH/mlflow.db")
        return sqlite_uri(path.expanduser().resolve())
    if parsed.scheme == "file":
        return local_path(uri).expanduser().resolve().as_uri()
    if parsed.scheme == "":
        return Path(uri).expanduser().resolve().as_uri()
    return uri.rstrip("/") if parsed.scheme in ("http", "https") else uri


def sqlite_uri(path: str | Path) -> str:
    """The SQLite URI of the database file ``path`` (absolute), as SQLAlchemy reads it back: the path as is, but
    ``%``, which SQLAlchemy decodes (``%20`` is a space to it)."""
    return "sqlite:///" + str(path).replace("%", "%25")


def local_path(uri: str) -> Path | None:
    """The file or folder of a local store as MLflow opens it: a SQLite URI's database (SQLAlchemy's ``make_url``),
    a ``file:`` URI's folder (percent-decoded, as MLflow's ``local_file_uri_to_path``); None for other stores."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        try:
            from sqlalchemy.engine import make_url

            database = make_url(uri).database
        except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: MLflow will say so
            database = unquote(uri[len("sqlite:///"):])
        return Path(database) if database else None
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    return None


def store_exists(uri: str) -> bool:
    """False only for a local store whose file or folder is missing (a server or database is assumed to exist)."""
    path = local_path(uri)
    if urlparse(uri).scheme == "sqlite":
        return path is not None and path.is_file()
    return path is None or path.exists()


def is_server(uri: str) -> bool:
    """Whether ``uri`` is a tracking server (http or https)."""
    return urlparse(uri).scheme in ("http", "https")


def is_local_store(uri: str) -> bool:
    """A store that lives on this machine's disk (SQLite file or folder): invisible to other machines."""
    return urlparse(uri).scheme in ("sqlite", "file", "")


SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
FILE_STORE_VAR = "MLFLOW_ALLOW_FILE_STORE"


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """Fail within ``timeout`` seconds, with one clear message, when the tracking store cannot be used.

    Without this, MLflow's HTTP client retries for minutes, and every trial on every node would fail the same way;
    a folder (MLflow's file store, refused by MLflow 3) or a file that is no database would end in MLflow's
    traceback.
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        _check_server(uri, timeout)
    elif parsed.scheme in ("sqlite", "file"):
        path = local_path(uri)
        if parsed.scheme == "file" and os.environ.get(FILE_STORE_VAR, "").lower() not in ("true", "1"):
            raise PtrayError(f"the tracking store {uri} is a folder (MLflow's file store), which MLflow 3 refuses; "
                             f"pass --tracking-uri {sqlite_uri(path / 'mlflow.db')} (a database in that folder), "
                             f"or set {FILE_STORE_VAR}=true to use the folder as it is")
        if parsed.scheme == "sqlite":
            _check_sqlite_file(uri, path)
        folder = path.parent if parsed.scheme == "sqlite" else path
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise PtrayError(f"cannot create the MLflow store {uri!r}: {str(folder)!r} is a file, not a folder")
        if not os.access(folder, os.W_OK):
            raise PtrayError(f"cannot write the MLflow store {uri!r}: {str(folder)!r} is not writable")
        if parsed.scheme == "sqlite":
            path.parent.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its folder
    # Other schemes (databricks, postgresql, ...) are checked by MLflow itself on first use (``open_store``).


def _check_sqlite_file(uri: str, path: Path) -> None:
    """An existing file named by a SQLite URI must be a SQLite database (an empty file becomes one)."""
    if path.is_dir():
        raise PtrayError(f"the tracking store {uri} names a folder, not a database file; pass "
                         f"--tracking-uri {sqlite_uri(path / 'mlflow.db')}")
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as err:
        raise PtrayError(f"cannot read the MLflow database {path}: {err.strerror}") from None
    if head != SQLITE_HEADER:
        raise PtrayError(f"the tracking store {uri} is not an SQLite database ({path} holds something else); pass "
                         f"the study's mlflow.db, or a new file name to start a new store")


def open_store(uri: str):
    """An ``MlflowClient`` on ``uri`` after one cheap query: a store MLflow cannot use (a folder MLflow 3 refuses,
    a damaged database, a database of another schema, a server that refuses us) is one ``PtrayError`` line that
    says what to do, not MLflow's traceback. ``check_tracking`` runs first."""
    check_tracking(uri)
    mlflow_client = client(uri)
    try:
        mlflow_client.search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - MlflowException, SQLAlchemy's errors, requests' errors...
        raise store_error(uri, err) from None
    return mlflow_client


def store_error(uri: str, err: BaseException) -> PtrayError:
    """MLflow's (or its database driver's) error on ``uri`` as one line that says what to do."""
    text = " ".join(str(err).split())
    if "filesystem tracking backend" in text or "file store" in text.lower():
        return PtrayError(f"the tracking store {uri} is a folder (MLflow's file store), which MLflow 3 refuses; "
                          f"pass --tracking-uri sqlite:///PATH/mlflow.db, or set {FILE_STORE_VAR}=true")
    if "not a database" in text or "malformed" in text:
        return PtrayError(f"the tracking store {uri} is not a usable SQLite database ({text.split(' [SQL')[0]}); "
                          f"pass the study's mlflow.db, or a new file name to start a new store")
    if "mlflow db upgrade" in text or "out-of-date database schema" in text:
        return PtrayError(f"the MLflow database {uri} was written by another MLflow version; back it up, then run "
                          f"`mlflow db upgrade {uri}`")
    first = text.split(" [SQL")[0][:300]
    return PtrayError(f"the MLflow store {uri} cannot be used: {type(err).__name__}: {first}; check --tracking-uri "
                      f"(or MLFLOW_TRACKING_URI)")


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
        raise deleted_experiment_error(exp, client_uri(mlflow_client))
    return exp.experiment_id


def client_uri(mlflow_client) -> str:
    """The tracking URI an ``MlflowClient`` is bound to."""
    return str(getattr(mlflow_client, "_tracking_client", mlflow_client).tracking_uri)


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


class ServerWatch:
    """While a study works against a tracking server: say once when the server stops answering (trials and the
    driver then wait in MLflow's retries, silently otherwise), and once when it answers again.

    A daemon thread probes ``/health`` every ``interval`` seconds; nothing runs for a local store. ``probe`` (a
    function returning whether the server answers) and ``say`` are for tests.
    """

    def __init__(self, uri: str, interval: float = 10.0, probe=None, say=None):
        self.uri, self.interval = uri, interval
        self.probe = probe or (lambda: _answers(uri, timeout=min(5.0, interval)))
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.down_since: float | None = None

    def __enter__(self) -> ServerWatch:
        if is_server(self.uri):
            self._thread = threading.Thread(target=self._loop, name="ptray-mlflow-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 6)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()

    def check(self) -> None:
        """One probe: a change between answering and not is said once."""
        ok = self.probe()
        if not ok and self.down_since is None:
            self.down_since = time.monotonic()
            self.say(f"the MLflow tracking server at {self.uri} does not answer; the study waits for it (MLflow "
                     f"retries its requests; trials may fail and be retried)")
        elif ok and self.down_since is not None:
            self.say(f"the MLflow tracking server at {self.uri} answers again after "
                     f"{time.monotonic() - self.down_since:.0f} s; the study goes on")
            self.down_since = None


def _answers(uri: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout) as response:
            response.read()
        return True
    except (urllib.error.URLError, OSError):
        return False


def ui_command(uri: str) -> str:
    """How to open the MLflow UI on this store."""
    if is_server(uri):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"



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
