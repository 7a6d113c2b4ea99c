"""cluster.yaml (Ray's own validation, offline) and the sweep on a multi-node Ray cluster: a head and two GPU worker
nodes on this machine (ray.cluster_utils.Cluster), a real MLflow server with proxied artifacts, and a worker node
removed while its trial runs."""

from __future__ import annotations

import copy
import re
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_tracking import mlflow_server

from ptray.lm.prompt import load_adapter
from ptray.study import store, tracking
from ptray.study.driver import main

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


def load_cluster_yaml() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def validate(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


# ---------------------------------------------------------------------------------------------------------------
# cluster.yaml


def test_cluster_yaml_passes_rays_validation():
    cfg = validate(load_cluster_yaml())
    assert cfg["provider"]["type"] == "aws"
    head = cfg["available_node_types"][cfg["head_node_type"]]
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert head["resources"].get("GPU", 0) == 0 and not head["node_config"]["InstanceType"].startswith(("g", "p"))
    (worker,) = workers.values()
    assert worker["resources"]["GPU"] >= 1 and worker["node_config"]["InstanceType"].startswith(("g6", "g6e", "p5"))
    assert 0 <= worker["min_workers"] <= worker["max_workers"] <= cfg["max_workers"]


def test_cluster_yaml_typos_are_rejected():
    # Ray's schema is strict: the validation above would catch a mistyped key or a wrong type.
    bad = load_cluster_yaml()
    bad["max_worker"] = bad.pop("max_workers")
    with pytest.raises(Exception, match="max_worker"):
        validate(bad)
    bad = load_cluster_yaml()
    bad["available_node_types"]["gpu_worker"]["min_workers"] = "none"
    with pytest.raises(Exception, match="'none' is not of type 'integer'"):
        validate(bad)


def test_cluster_yaml_keeps_services_private_and_installs_cuda_torch():
    cfg = load_cluster_yaml()
    text = CLUSTER_YAML.read_text()
    # Nothing but Ray's SSH rule is opened: no extra inbound rules, no dashboard on all interfaces.
    assert "IpPermissions" not in cfg["provider"].get("security_group", {})
    assert "0.0.0.0/0" not in text and "--dashboard-host" not in text
    setup = " ".join(cfg["setup_commands"])
    assert re.search(r"torch==[\d.]+ --index-url https://download\.pytorch\.org/whl/cu\d+", setup)
    assert "ptray[sweep" in setup
    start = " ".join(cfg["head_start_ray_commands"])
    assert "mlflow server" in start and "--workers 1" in start and "--backend-store-uri sqlite:///" in start
    assert "--artifacts-destination" in start and "--host 0.0.0.0" in start  # workers reach it; the SG guards it
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in start


def test_every_key_of_cluster_yaml_is_commented():
    lines = CLUSTER_YAML.read_text().splitlines()
    uncommented = []
    for i, line in enumerate(lines):
        if not re.match(r"^\s*(- )?[\"A-Za-z_~][^:#]*:(\s|$)", line) or line.lstrip().startswith("#"):
            continue
        previous = next((p for p in reversed(lines[:i]) if p.strip()), "")
        if "#" not in line and not previous.lstrip().startswith("#"):
            uncommented.append(f"{i + 1}: {line.strip()}")
    assert not uncommented, "keys without a comment:\n" + "\n".join(uncommented)


# ---------------------------------------------------------------------------------------------------------------
# a multi-node cluster on this machine


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-cluster")) as uri:
        yield uri


@pytest.fixture(scope="module")
def cluster():
    """A head with no CPU (as in cluster.yaml) and two workers declaring one GPU each."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    yield c
    ray.shutdown()
    c.shutdown()


def ensure_workers(cluster, n=2):
    while len(cluster.worker_nodes) < n:
        cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()


def sweep(tmp_path, server, cluster, study, *extra) -> int:
    return main([
        "--smoke", "--study", study, "--address", cluster.address, "--tracking-uri", server,
        "--storage-path", str(tmp_path / "ray_results"), "--gpus-per-trial", "0.5", "--no-analysis", *extra,
    ])


def study_runs(uri, study):
    mc = store.client(uri)
    exp = mc.get_experiment_by_name(f"ptray-{study}").experiment_id
    return mc, exp, tracking.search_study_runs(mc, exp, study)


@pytest.mark.slow
def test_multi_node_study_logs_every_trial_once_to_the_server(tmp_path, server, cluster, data_dir):
    ensure_workers(cluster)
    worker_ids = {n.node_id for n in cluster.worker_nodes}
    assert sweep(tmp_path, server, cluster, "multi", "--data-dir", str(data_dir), "--tasks", "cb,rte",
                 "--seeds", "0,1") == 0
    mc, _, runs = study_runs(server, "multi")
    names = sorted(r.info.run_name for r in runs)
    assert names == sorted(["cb-seed0", "cb-seed1", "rte-seed0", "rte-seed1", "baseline-none-on-cb",
                            "baseline-none-on-rte"]
                           + [f"transfer-{s}-seed{k}-on-{t}" for s in ("cb", "rte") for k in (0, 1)
                              for t in ("cb", "rte")])
    assert all(r.info.status == "FINISHED" for r in runs)
    for run in (r for r in runs if r.data.tags["ptray.kind"] == "train"):
        # Trials ran on the GPU workers (the head offers no CPU), and logged through the server's artifact proxy.
        assert run.data.tags["ptray.ray_node_id"] in worker_ids
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert tracking.logged_epochs(mc, run.info.run_id) == [1, 2]
        assert [m.step for m in mc.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
        prompt = load_adapter(mc.download_artifacts(run.info.run_id, "prompt", str(tmp_path / run.info.run_id)))
        assert prompt.shape[0] == int(run.data.params["num_tokens"]) and prompt.shape[1] == 64


@pytest.mark.slow
def test_lost_worker_node_resumes_the_trial_in_the_same_run(tmp_path, server, cluster, data_dir):
    """Chaos: the node of a running trial, a group of two prompts, is removed; the group restarts on the other node
    from its checkpoint, each prompt in its own MLflow run."""
    ensure_workers(cluster)
    epochs = 8
    killed: dict = {}

    def kill_a_running_trials_node():
        mc = store.client(server)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            exp = mc.get_experiment_by_name("ptray-chaos")
            runs = tracking.search_study_runs(mc, exp.experiment_id, "chaos", kind="train") if exp else []
            for run in runs:
                done = tracking.logged_epochs(mc, run.info.run_id) if run.info.status == "RUNNING" else []
                node = next((n for n in cluster.worker_nodes
                             if n.node_id == run.data.tags.get("ptray.ray_node_id")), None)
                if node is not None and 2 <= len(done) <= epochs - 3:
                    killed.update(run_id=run.info.run_id, name=run.info.run_name, epochs=len(done))
                    cluster.remove_node(node, allow_graceful=False)
                    return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_a_running_trials_node, daemon=True)
    watcher.start()
    code = sweep(tmp_path, server, cluster, "chaos", "--data-dir", str(data_dir), "--tasks", "cb", "--seeds", "0,1",
                 "--max-epochs", str(epochs), "--patience", str(epochs), "--group-size", "2")
    watcher.join(timeout=10)
    assert killed, "no trial was caught running on a worker node"
    assert code == 0
    mc, _, runs = study_runs(server, "chaos")
    names = [r.info.run_name for r in runs]
    assert sorted(names) == sorted(["cb-seed0", "cb-seed1", "baseline-none-on-cb", "transfer-cb-seed0-on-cb",
                                    "transfer-cb-seed1-on-cb"])  # no duplicate
    (run,) = [r for r in runs if r.info.run_name == killed["name"]]
    assert run.info.run_id == killed["run_id"]  # the same MLflow run continued
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["ptray.resumed_after_epoch"]) >= killed["epochs"]  # resumed, not restarted
    survivors = {n.node_id for n in cluster.worker_nodes}
    assert run.data.tags["ptray.ray_node_id"] in survivors
    for run in (r for r in runs if r.data.tags["ptray.kind"] == "train"):  # both prompts of the lost group
        assert run.info.status == "FINISHED" and "ptray.resumed_after_epoch" in run.data.tags
        assert run.data.params["group_size"] == "2"
        for key in ("eval_loss", "train_loss", "exact_match", "rank_accuracy"):
            assert [m.step for m in mc.get_metric_history(run.info.run_id, key)] == list(range(1, epochs + 1)), key


@pytest.mark.parametrize("error", [Exception("The current node timed out during startup. This could happen because "
                                             "some of the Ray processes failed to startup.\nmore"),
                                   TimeoutError("Timed out while waiting for GCS"), ConnectionError("refused"),
                                   Exception()])
def test_a_ray_that_does_not_start_is_one_line(monkeypatch, error):
    """Whatever Ray's start raises (a bare Exception on a startup timeout, TimeoutError, ConnectionError) reaches
    the user as one PtrayError line naming the exception and where Ray's logs are."""
    import ray

    from ptray.errors import PtrayError
    from ptray.study.cluster import start_ray

    def fail(*args, **kwargs):
        raise error

    shutdowns = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fail)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))
    with pytest.raises(PtrayError) as info:
        start_ray(None)
    assert shutdowns == [1]  # whatever had started is stopped
    msg = str(info.value)
    said = f": {str(error).splitlines()[0]}" if str(error) else ""  # no empty ": " after a bare Exception()
    assert msg.startswith(f"could not start an embedded Ray: {type(error).__name__}{said} (Ray's own logs")
    assert "\n" not in msg and "session_latest/logs" in msg
    with pytest.raises(PtrayError, match=r"could not start the Ray cluster at '10.0.0.1:6379'"):
        start_ray("10.0.0.1:6379")
