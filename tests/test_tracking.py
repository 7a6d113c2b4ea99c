"""ptray.tracking: the names and tags of docs/tracking.md, URI handling, the fast reachability check, history sync,
and a real `mlflow server` on localhost (proxied artifacts, as on a cluster)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from ptray import layout
from ptray.errors import PtrayError
from ptray.files import write_json
from ptray.study import store, tracking

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(folder: Path, timeout: float = 90.0):
    """A real `mlflow server` (SQLite backend, artifacts proxied from a local folder) on a free localhost port.

    One worker and no job runner keep it at about 0.5 GB (STACK-NOTES). Yields its URI; stopped on exit.
    """
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(folder / "server.log", "w")  # noqa: SIM115 - closed below
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", str(folder / "artifacts")]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise RuntimeError(f"mlflow server did not start:\n{(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield uri
    finally:
        # The server forks workers in its own session: stop the whole group.
        try:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri


def sqlite_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


# ---------------------------------------------------------------------------------------------------------------


def test_run_names_and_tags_follow_the_contract():
    assert layout.train_run_name("cb", 0) == "cb-seed0"
    assert layout.transfer_run_name("rte", 1, "wsc") == "transfer-rte-seed1-on-wsc"
    assert layout.baseline_run_name("wsc") == "baseline-none-on-wsc"
    assert layout.run_tags("paper", "train", "cb", 0) == {
        "ptray.study": "paper", "ptray.kind": "train", "ptray.task": "cb", "ptray.seed": "0"}
    assert layout.run_tags("paper", "transfer", seed=1, source="rte", target="wsc") == {
        "ptray.study": "paper", "ptray.kind": "transfer", "ptray.task": "wsc", "ptray.seed": "1",
        "ptray.source": "rte", "ptray.target": "wsc"}
    assert layout.run_tags("paper", "baseline", target="wsc") == {
        "ptray.study": "paper", "ptray.kind": "baseline", "ptray.task": "wsc", "ptray.source": "none",
        "ptray.target": "wsc"}
    with pytest.raises(ValueError, match="kind must be one of"):
        layout.run_tags("paper", "eval")


def test_predictions_and_eval_metrics_follow_one_schema():
    from ptray.lm.evaluate import EvalResult

    res = EvalResult(loss=0.5, exact_match=0.5, rank_accuracy=1.0, num_examples=2, em_correct=[1, 0],
                     rank_correct=[1, 1], rank_pred=[0, 2])
    base = EvalResult(loss=0.7, exact_match=0.0, rank_accuracy=0.5, num_examples=2, em_correct=[0, 0],
                      rank_correct=[1, 0], rank_pred=[0, 1])
    preds = layout.predictions([7, 9], res, {"no_prompt": base})
    assert preds == {"idx": [7, 9], "em_correct": [1, 0], "rank_correct": [1, 1], "rank_pred": [0, 2],
                     "baselines": {"no_prompt": {"em_correct": [0, 0], "rank_correct": [1, 0], "rank_pred": [0, 1]}}}
    assert layout.predictions([7, 9], base) == {"idx": [7, 9], "em_correct": [0, 0], "rank_correct": [1, 0],
                                                "rank_pred": [0, 1]}
    assert layout.prediction_lists(preds) == ([7, 9], [1, 0], [1, 1])
    assert layout.prediction_lists(preds, baseline="no_prompt") == ([7, 9], [0, 0], [1, 0])
    assert layout.prediction_lists({}) == ([], [], [])
    m = layout.eval_metrics("cb", 1, "rte", res, {"exact_match": 0.25, "rank_accuracy": 0.75})
    assert tuple(m) == layout.EVAL_METRIC_KEYS
    assert (m["source"], m["source_seed"], m["delta_exact_match"], m["delta_rank_accuracy"]) == ("cb", 1, 0.25, 0.25)
    assert layout.eval_metrics(None, None, "rte", base, {"exact_match": 0.0, "rank_accuracy": 0.5})["source"] == "none"


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert store.resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Relative SQLite paths become absolute: trials run in other working directories.
    assert store.resolve_tracking_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path / 'sub' / 'x.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.5:5000/")
    assert store.resolve_tracking_uri() == "http://10.0.0.5:5000"
    assert store.resolve_tracking_uri("http://h:1") == "http://h:1"  # the flag wins over the environment
    with pytest.raises(PtrayError, match="names no database file"):
        store.resolve_tracking_uri("sqlite://")


def test_unreachable_server_fails_fast():
    closed = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(PtrayError, match=r"cannot reach the MLflow tracking server at http://127\.0\.0\.1"):
        store.check_tracking(closed, timeout=2)
    # A host that never answers (TEST-NET-1, RFC 5737) must also fail within the timeout, not after retries.
    with pytest.raises(PtrayError, match="cannot reach the MLflow tracking server at http://192.0.2.1:5000"):
        store.check_tracking("http://192.0.2.1:5000", timeout=2)
    assert time.monotonic() - t0 < 10


def test_a_store_under_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(PtrayError, match="is a file, not a folder"):
        store.check_tracking(f"sqlite:///{tmp_path / 'afile' / 'mlflow.db'}")
    store.check_tracking(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")  # a folder still to create is fine


def _history(n):
    return [{"epoch": e, "train_loss": 1.0 / e, "eval_loss": 2.0 / e, "exact_match": 0.1 * e} for e in range(1, n + 1)]


def test_sync_history_backfills_the_missing_epoch(tmp_path):
    mc = store.client(sqlite_uri(tmp_path))
    exp = tracking.get_or_create_experiment(mc, "e")
    run = tracking.create_run(mc, exp, "cb-seed0", layout.run_tags("s", "train", "cb", 0))
    for row in _history(2):
        tracking.log_metrics(mc, run.info.run_id, tracking.epoch_metrics(row), step=row["epoch"])
    # The checkpoint holds 3 epochs, MLflow 2 (the trial died between checkpoint and log): epoch 3 is added.
    run_id = tracking.sync_history(mc, mc.get_run(run.info.run_id), _history(3))
    assert run_id == run.info.run_id
    assert tracking.logged_epochs(mc, run_id) == [1, 2, 3]
    assert [m.step for m in mc.get_metric_history(run_id, "exact_match")] == [1, 2, 3]


def test_sync_history_replaces_a_run_that_is_ahead_of_its_checkpoint(tmp_path):
    mc = store.client(sqlite_uri(tmp_path))
    exp = tracking.get_or_create_experiment(mc, "e")
    run = tracking.create_run(mc, exp, "cb-seed0", layout.run_tags("s", "train", "cb", 0))
    mc.log_param(run.info.run_id, "lr", "0.03")
    for row in _history(3):
        tracking.log_metrics(mc, run.info.run_id, tracking.epoch_metrics(row), step=row["epoch"])
    # Tune restored an older checkpoint (epoch 1): epochs 2-3 would be logged twice; the run is replaced.
    new_id = tracking.sync_history(mc, mc.get_run(run.info.run_id), _history(1))
    assert new_id != run.info.run_id
    assert tracking.logged_epochs(mc, new_id) == [1]
    new = mc.get_run(new_id)
    assert new.info.run_name == "cb-seed0" and new.data.params == {"lr": "0.03"}
    assert new.data.tags["ptray.study"] == "s" and new.data.tags["ptray.replaces"] == run.info.run_id
    assert mc.get_run(run.info.run_id).info.lifecycle_stage == "deleted"
    assert [r.info.run_id for r in tracking.search_study_runs(mc, exp, "s")] == [new_id]


def test_params_are_logged_once_and_never_changed(tmp_path):
    mc = store.client(sqlite_uri(tmp_path))
    exp = tracking.get_or_create_experiment(mc, "e")
    run_id = tracking.create_run(mc, exp, "r", layout.run_tags("s", "train", "cb", 0)).info.run_id
    tracking.log_params_once(mc, run_id, {"lr": 0.03, "verbalizer": {"b": "no", "a": "yes"}, "n": None})
    tracking.log_params_once(mc, run_id, {"lr": 0.05, "device": "cpu"})  # lr is kept, device added
    assert mc.get_run(run_id).data.params == {"lr": "0.03", "verbalizer": '{"a": "yes", "b": "no"}', "n": "null",
                                               "device": "cpu"}


def test_finishing_marks_a_run_finished_or_failed_and_reraises(tmp_path):
    mc = store.client(sqlite_uri(tmp_path))
    exp = tracking.get_or_create_experiment(mc, "e")
    ok = tracking.create_run(mc, exp, "ok", layout.run_tags("s", "baseline", target="cb")).info.run_id
    with tracking.finishing(mc, ok):
        tracking.log_metrics(mc, ok, {"exact_match": 0.5})
    assert mc.get_run(ok).info.status == "FINISHED"
    broken = tracking.create_run(mc, exp, "broken", layout.run_tags("s", "baseline", target="rte")).info.run_id
    with pytest.raises(KeyboardInterrupt):  # any exception, Ctrl-C too: the run must not pass for complete
        with tracking.finishing(mc, broken):
            raise KeyboardInterrupt
    assert mc.get_run(broken).info.status == "FAILED"

    class DeadStore:
        def set_terminated(self, run_id, status):
            raise ConnectionError("store gone")

    with pytest.raises(ValueError, match="the real error"):  # the store's error does not hide the one that got us here
        with tracking.finishing(DeadStore(), "r"):
            raise ValueError("the real error")


def test_plan_is_stored_with_the_experiment(tmp_path):
    mc = store.client(sqlite_uri(tmp_path))
    assert tracking.read_plan(mc, "ptray-x", "x") is None
    exp = tracking.get_or_create_experiment(mc, "ptray-x")
    tracking.write_plan(mc, exp, "x", {"tasks": ["cb"], "seeds": [0, 1]})
    assert tracking.read_plan(mc, "ptray-x", "x") == {"tasks": ["cb"], "seeds": [0, 1]}
    assert tracking.read_plan(mc, "ptray-x", "other") is None


@pytest.mark.slow
def test_real_mlflow_server_serves_runs_and_artifacts(server, tmp_path):
    store.check_tracking(server)  # reachable: no error
    mc = store.client(server)
    exp = tracking.get_or_create_experiment(mc, "server-check")
    run = tracking.create_run(mc, exp, "cb-seed0", layout.run_tags("s", "train", "cb", 0))
    # Artifacts go through the server (no shared disk): the run's artifact URI is the proxy scheme.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    (tmp_path / "a").mkdir()
    write_json(tmp_path / "a" / "metrics.json", {"exact_match": 0.5})
    mc.log_artifacts(run.info.run_id, str(tmp_path / "a"))
    tracking.log_metrics(mc, run.info.run_id, {"eval_loss": 1.5}, step=1)
    got = mc.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path / "down"))
    assert Path(got).read_text().strip().endswith("}") and '"exact_match": 0.5' in Path(got).read_text()
    assert tracking.logged_epochs(mc, run.info.run_id) == [1]
    assert tracking.find_run(mc, exp, "s", "cb-seed0").info.run_id == run.info.run_id


@pytest.mark.slow
def test_sweep_with_an_unreachable_tracking_uri_fails_fast(tmp_path, data_dir):
    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "sweeps" / "all.py"), "--smoke", "--data-dir", str(data_dir),
         "--tracking-uri", f"http://127.0.0.1:{port}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"error: cannot reach the MLflow tracking server at http://127.0.0.1:{port} "
                                   f"([Errno 111] Connection refused); start it, or pass another --tracking-uri "
                                   f"(or MLFLOW_TRACKING_URI)")
    assert time.monotonic() - t0 < 30  # the interpreter and imports included
    assert not (tmp_path / "ray_results").exists()  # nothing started
