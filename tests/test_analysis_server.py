"""The analysis against an MLflow tracking server that serves the artifacts over HTTP (no shared disk)."""

import os
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
from analysis_store import build_store

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start in 60 s")
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_report_from_a_tracking_server(server, tmp_path, tiny_model_dir, data_dir):
    from mlflow.tracking import MlflowClient

    from analysis import run

    store = build_store(tmp_path / "unused", tiny_model_dir, data_dir, tasks=("cb", "rte", "wsc"),
                        max_examples=8, tracking_uri=server)
    client = MlflowClient(tracking_uri=server)
    exp = client.get_experiment_by_name(store.experiment)
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # artifacts only reachable over HTTP
    out = run(store.experiment, tracking_uri=server, out_dir=tmp_path / "report", n_boot=100, faithfulness=False)
    assert (out / "report.html").is_file() and (out / "transfer.png").is_file()
    assert set(pd.read_csv(out / "table1_norms.csv")["task"]) == {"cb", "rte", "wsc"}
    found = client.search_runs([exp.experiment_id], "tags.`ptray.kind` = 'analysis'")
    assert len(found) == 1
    assert "report.html" in {f.path for f in client.list_artifacts(found[0].info.run_id)}
