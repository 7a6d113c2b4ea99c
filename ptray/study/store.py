"""The MLflow tracking store: where it is (``--tracking-uri``, made absolute), whether it can be used (a fast check
that says what to change instead of MLflow's retries and tracebacks), the client bound to it, a watch on a tracking
server during a study, and how to open its UI.

Everything goes through an explicit ``MlflowClient(tracking_uri)`` (``client``), never MLflow's global "active
run", so a Ray worker that runs many trials one after another (or a trial resumed on another node) never logs into a
stale run. What is logged into the store is ``ptray.study.tracking``'s.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from ptray.errors import PtrayError
from ptray.files import disk_full_error

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: the first creation is not serialised there
    fcntl = None


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


ARTIFACTS_SUFFIX = "-artifacts"  # mlflow.db -> mlflow-artifacts/, beside it


def artifact_root(uri: str) -> Path | None:
    """Where the experiments ptray creates in a SQLite store keep their artifacts: the folder ``<name>-artifacts``
    beside the database file (``mlflow-artifacts/`` beside ``mlflow.db``), one subfolder per experiment id, as a
    server's ``--default-artifact-root``. MLflow's own default, ``./mlruns`` of whatever folder an experiment was
    created from, would part the runs from their files when that folder is deleted. None for other stores: a
    server decides where its artifacts go, a file store keeps them in its folder."""
    if urlparse(uri).scheme != "sqlite":
        return None
    path = local_path(uri)
    return path.with_name(path.stem + ARTIFACTS_SUFFIX) if path is not None else None


def artifact_place(location: str) -> str:
    """An experiment's ``artifact_location`` as a user reads it: a local folder as its path, else the URI."""
    return str(local_path(location)) if urlparse(location).scheme == "file" else location


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
    with _first_creation(uri):
        try:
            mlflow_client = client(uri)  # MLflow opens (and creates) a SQLite store here
            mlflow_client.search_experiments(max_results=1)
        except ImportError:  # MLflow not installed: the caller's case (a local study publishes later), not the store's
            raise
        except Exception as err:  # noqa: BLE001 - MlflowException, SQLAlchemy's errors, requests' errors...
            raise store_error(uri, err) from None
    return mlflow_client


@contextlib.contextmanager
def _first_creation(uri: str):
    """Around opening a SQLite store (MLflow creates or upgrades its tables there): one process at a time, through an
    exclusive lock on a file beside it (``.NAME.lock``), so that two studies started together on a new file do not
    both create MLflow's tables ("table ... already exists", "duplicate column name: step"). Every open takes it,
    not only a missing or empty file's: a file becomes non-empty while its first process is still creating tables,
    and a second process arriving then would race it. The lock is held for the open and one query (milliseconds
    once the tables exist)."""
    path = local_path(uri) if urlparse(uri).scheme == "sqlite" else None
    if path is None or fcntl is None:
        yield
        return
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield


def store_error(uri: str, err: BaseException) -> PtrayError:
    """MLflow's (or its database driver's) error on ``uri`` as one line that says what to do."""
    text = " ".join(str(err).split())
    if "filesystem tracking backend" in text or "file store" in text.lower():
        return PtrayError(f"the tracking store {uri} is a folder (MLflow's file store), which MLflow 3 refuses; "
                          f"pass --tracking-uri sqlite:///PATH/mlflow.db, or set {FILE_STORE_VAR}=true")
    if "not a database" in text or "malformed" in text:
        return PtrayError(f"the tracking store {uri} is not a usable SQLite database ({text.split(' [SQL')[0]}); "
                          f"pass the study's mlflow.db, or a new file name to start a new store")
    if "database or disk is full" in text and local_path(uri) is not None:  # SQLite's words for ENOSPC
        return disk_full_error(local_path(uri).parent)
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


def client_uri(mlflow_client) -> str:
    """The tracking URI an ``MlflowClient`` is bound to."""
    return str(getattr(mlflow_client, "_tracking_client", mlflow_client).tracking_uri)


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
