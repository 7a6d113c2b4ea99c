"""Faults of a study's checks and resume, each a kind fixed everywhere it can occur (sweep, analysis): a model folder
changed under --resume, a resource request no node can hold, a tracking store MLflow refuses, a store path with
spaces, a deleted experiment, and the loose ends of a chaos run (replaced runs left RUNNING, ties in the summary,
a silent tracking-server outage, Ray processes left by a killed driver)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ptray import layout
from ptray.errors import PtrayError
from ptray.study import cluster, fingerprint, store, tracking


def _study(capsys, *argv) -> tuple[int, str, str]:
    from ptray.study.driver import main

    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _analyse(capsys, *argv) -> tuple[int, str]:
    from analysis.__main__ import main

    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def _store_plan(uri: str, plan) -> str:
    mc = store.open_store(uri)
    exp = tracking.get_or_create_experiment(mc, f"ptray-{plan.study}")
    tracking.write_plan(mc, exp, plan.study, plan.to_json())
    return exp


# ---------------------------------------------------------------------------------------------------------------
# 3. --resume refuses a model that is not the one the study's trials trained on


def _rewrite_weights(folder: Path) -> None:
    """Retrain in place: the same shapes and dtypes (an identical safetensors header), other values."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    save_file({k: v + 0.01 for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def test_a_model_folders_fingerprint_names_what_changed(tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    digest, files = fingerprint.model_fingerprint(str(folder))
    assert "config.json" in files and "model.safetensors" in files and any("tokenizer" in f for f in files)
    assert fingerprint.model_fingerprint(str(folder)) == (digest, files)  # stable
    os.utime(folder / "config.json")  # touched, not changed: the same model
    assert fingerprint.model_fingerprint(str(folder))[0] == digest
    _rewrite_weights(folder)
    (folder / "tokenizer_config.json").unlink()
    new_digest, new_files = fingerprint.model_fingerprint(str(folder))
    assert fingerprint.model_change(str(folder), digest, files, new_digest, new_files) == (
        f"the model folder {folder} changed since the study started: model.safetensors changed, "
        f"tokenizer_config.json removed")


def test_resume_refuses_a_rebuilt_model_folder(workdir, tiny_model_dir, data_dir, capsys):
    from ptray.config import TrainConfig
    from ptray.plan import Plan

    folder = workdir / "model"
    shutil.copytree(tiny_model_dir, folder)
    digest, files = fingerprint.model_fingerprint(str(folder))
    plan = Plan(study="S", tasks=("cb",), seeds=(0,), group_size=1, model_digest=digest, model_files=files,
                train=TrainConfig(model=str(folder), data_dir=str(data_dir), max_epochs=1))
    _store_plan(store.resolve_tracking_uri(), plan)
    _rewrite_weights(folder)
    code, _, err = _study(capsys, "--resume", "--study", "S")
    assert code == 2
    assert err == (f"error: --resume of study 'S': the model folder {folder} changed since the study started: "
                   f"model.safetensors changed; its trials trained on the old model and its transfer would evaluate "
                   f"on the new one: restore the model, or start a new --study\n")


def test_a_hub_models_revision_is_recorded_and_compared(monkeypatch):
    import huggingface_hub

    snapshot = "/cache/models--org--m/snapshots/{}/config.json"
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda name, f: snapshot.format("a" * 40))
    assert fingerprint.model_fingerprint("org/m") == ("hub:org/m@" + "a" * 40, None)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda name, f: None)
    assert fingerprint.model_fingerprint("org/m") == ("hub:org/m", None)  # not cached: the name
    assert fingerprint.model_change("org/m", "hub:org/m@" + "a" * 40, None, "hub:org/m@" + "b" * 40, None) == (
        "the Hub model org/m is now at revision bbbbbbbbbbbb in the local cache, the study started at aaaaaaaaaaaa")
    assert fingerprint.model_change("org/m", "hub:org/m", None, "hub:org/m@" + "b" * 40, None) is None  # unknown then
    assert fingerprint.model_change("org/m", None, None, "hub:org/m", None) is None  # a plan stored before digests


# ---------------------------------------------------------------------------------------------------------------
# 8. a resource request no node can hold is refused before anything starts


def test_a_request_no_node_can_hold_is_refused_with_the_largest_that_fits():
    two_cpus = [{"CPU": 2.0, "memory": 1e9}]
    with pytest.raises(PtrayError) as err:
        cluster.check_resources({"a training trial": (8, 0)}, two_cpus)
    assert str(err.value) == ("a training trial asks for 8 CPU + 0 GPU, but no node of the Ray cluster has that much "
                              "(2 CPU + 0 GPU); it would wait forever; pass --cpus-per-trial 2 or less")
    gpu_nodes = [{"CPU": 1.0}, {"CPU": 16.0, "GPU": 1.0}]
    with pytest.raises(PtrayError, match=r"asks for 1 CPU \+ 2 GPU.*\(16 CPU \+ 1 GPU, 1 CPU \+ 0 GPU\).*"
                                         r"pass --gpus-per-trial 1 or less$"):
        cluster.check_resources({"a training trial": (1, 2)}, gpu_nodes)
    with pytest.raises(PtrayError, match=r"pass --cpus-per-trial 16 or less or --gpus-per-trial 0$"):
        cluster.check_resources({"a transfer evaluation": (32, 0.25)}, [{"CPU": 32.0}, {"CPU": 16.0, "GPU": 1.0}])
    cluster.check_resources({"a training trial": (2, 0.25)}, two_cpus, node_types=[{"CPU": 4.0, "GPU": 1.0}])
    cluster.check_resources({"a training trial": (1, 0.25), "a transfer evaluation": (1, 0.25)}, gpu_nodes)


@pytest.mark.slow
def test_the_study_refuses_more_cpus_than_the_machine_has(workdir, capsys):
    code, _, err = _study(capsys, "--smoke", "--study", "big", "--tasks", "cb", "--seeds", "0",
                          "--cpus-per-trial", "100000", "--no-analysis")
    assert code == 2
    cpus = os.cpu_count()  # what an embedded Ray declares
    assert err.splitlines()[-1] == (  # before it, Ray's own "Started a local Ray instance." log line
        f"error: a training trial asks for 100000 CPU + 0 GPU, but no node of the Ray cluster has that much "
        f"({cpus} CPU + 0 GPU); it would wait forever; pass --cpus-per-trial {cpus} or less")
    assert not (workdir / "outputs").exists()  # no Tune folder: no trial started


# ---------------------------------------------------------------------------------------------------------------
# 12. a store MLflow refuses is one line that says what to do, in the sweep and in the analysis


def test_a_folder_as_tracking_uri_is_one_line_in_the_sweep_and_the_analysis(workdir, capsys):
    (workdir / "runs").mkdir()
    code, _, err = _study(capsys, "--smoke", "--study", "f", "--tasks", "cb", "--seeds", "0",
                          "--tracking-uri", "runs")
    want = (f"error: the tracking store {(workdir / 'runs').as_uri()} is a folder (MLflow's file store), which "
            f"MLflow 3 refuses; pass --tracking-uri sqlite:///{workdir / 'runs' / 'mlflow.db'} (a database in that "
            f"folder), or set MLFLOW_ALLOW_FILE_STORE=true to use the folder as it is\n")
    assert (code, err) == (2, want)
    assert _analyse(capsys, "--experiment", "ptray-f", "--tracking-uri", "runs") == (2, want)


def test_a_file_that_is_not_a_database_is_one_line_in_the_sweep_and_the_analysis(workdir, capsys):
    (workdir / "mlflow.db").write_text("these are notes, not a database\n")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    want = (f"error: the tracking store {uri} is not an SQLite database ({workdir / 'mlflow.db'} holds something "
            f"else); pass the study's mlflow.db, or a new file name to start a new store\n")
    assert _study(capsys, "--smoke", "--study", "f", "--tasks", "cb", "--seeds", "0")[::2] == (2, want)
    assert _study(capsys, "--resume", "--study", "f")[::2] == (2, want)
    assert _analyse(capsys, "--experiment", "ptray-f", "--tracking-uri", "mlflow.db".join(["sqlite:///", ""])) \
        == (2, want)


def test_mlflows_own_store_errors_are_translated(tmp_path):
    from mlflow import MlflowClient

    folder = tmp_path / "store"
    folder.mkdir()
    try:
        MlflowClient(tracking_uri=folder.as_uri()).search_experiments()
    except Exception as raised:  # noqa: BLE001 - MLflow 3's refusal of the file store
        err = store.store_error(folder.as_uri(), raised)
    assert str(err).startswith(f"the tracking store {folder.as_uri()} is a folder (MLflow's file store)")
    assert "\n" not in str(store.store_error("sqlite:////x.db", RuntimeError("a\nb [SQL: SELECT 1]")))


# ---------------------------------------------------------------------------------------------------------------
# 13. a store path with spaces names the same folder when written, on --resume and in the analysis


def test_a_file_store_with_spaces_is_found_again(workdir, capsys, monkeypatch):
    from analysis import mlflow_io
    from ptray.plan import Plan

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = store.resolve_tracking_uri("my runs")
    assert uri == (workdir / "my runs").as_uri() and "%20" in uri
    assert store.local_path(uri) == workdir / "my runs"
    _store_plan(uri, Plan(study="S", tasks=("cb",), seeds=(0,)))
    assert (workdir / "my runs").is_dir() and not (workdir / "my%20runs").exists()
    assert store.store_exists(uri)
    code, out, err = _study(capsys, "--resume", "--study", "S", "--tracking-uri", "my runs", "--dry-run")
    assert code == 0, err
    assert "study 'S' (resume)" in out
    client, _ = mlflow_io.connect("my runs")
    assert mlflow_io.find_experiment(client, "ptray-S").name == "ptray-S"


def test_a_sqlite_uri_is_read_as_sqlalchemy_reads_it(workdir):
    # SQLAlchemy decodes %20: the database lies in "sp ace", and so must every check and the resume look there
    uri = store.resolve_tracking_uri("sqlite:///sp%20ace/m.db")
    assert uri == f"sqlite:///{workdir / 'sp ace' / 'm.db'}"
    assert store.resolve_tracking_uri(uri) == uri
    store.open_store(uri).create_experiment("e")
    assert (workdir / "sp ace" / "m.db").is_file() and not (workdir / "sp%20ace").exists()
    assert store.store_exists(uri)
    percent = store.resolve_tracking_uri(store.sqlite_uri(workdir / "100% done" / "m.db"))
    assert store.local_path(percent) == workdir / "100% done" / "m.db"


# ---------------------------------------------------------------------------------------------------------------
# a dry run says what the real run would do: refuse an existing or deleted study in the same words, or what a
# resume has left


def test_a_dry_run_refuses_what_the_run_refuses_in_the_same_words(workdir, capsys, data_dir):
    from ptray.plan import Plan

    uri = store.resolve_tracking_uri()
    exp = _store_plan(uri, Plan(study="S", tasks=("cb",), seeds=(0, 1)))
    argv = ("--study", "S", "--tasks", "cb", "--seeds", "0,1", "--smoke", "--data-dir", str(data_dir))
    want = (f"error: study 'S' already exists in MLflow experiment 'ptray-S' at {uri}; pass --resume to finish it, "
            f"or choose another --study\n")
    assert _study(capsys, *argv)[::2] == (2, want)
    assert _study(capsys, *argv, "--dry-run")[::2] == (2, want)  # was: the plan, "(new)"
    # a resume's dry run says what is left: here cb-seed0 finished, cb-seed1 and every evaluation not
    mc = store.open_store(uri)
    run = tracking.create_run(mc, exp, layout.train_run_name("cb", 0), layout.run_tags("S", layout.TRAIN, "cb", 0))
    mc.set_terminated(run.info.run_id, layout.FINISHED)
    code, out, err = _study(capsys, "--resume", "--study", "S", "--dry-run")
    assert code == 0, err
    assert "study 'S' (resume)" in out
    assert out.splitlines()[-1] == ("  left       1 of 2 trials to train (cb-seed1), 3 of 3 evaluations; 1 trials "
                                    "finished")
    # deleted: the dry run of a new study says how to restore or purge it, as the run does
    store.client(uri).delete_experiment(exp)
    deleted = _study(capsys, *argv)
    assert deleted[0] == 2 and "was deleted; restore it with" in deleted[2]
    assert _study(capsys, *argv, "--dry-run")[::2] == deleted[::2]
    # a local study's folder that holds a study: the same line from the run and its dry run
    folder = workdir / "local"
    folder.mkdir()
    (folder / "plan.json").write_text("{}")
    local = (*argv, "--local", str(folder))
    want = f"error: --local {str(folder)!r} already holds files; choose a new --local or resume it with --resume\n"
    assert _study(capsys, *local)[::2] == (2, want)
    assert _study(capsys, *local, "--dry-run")[::2] == (2, want)


def test_a_dry_run_with_no_store_creates_none(workdir, capsys, data_dir):
    code, out, err = _study(capsys, "--study", "S", "--tasks", "cb", "--seeds", "0", "--smoke", "--dry-run",
                            "--data-dir", str(data_dir))
    assert (code, err) == (0, "") and "study 'S' (new, smoke)" in out
    assert not (workdir / "mlflow.db").exists()


# ---------------------------------------------------------------------------------------------------------------
# 14. a deleted experiment: say so, and how to restore or purge it


def test_resume_of_a_study_whose_experiment_was_deleted(workdir, capsys):
    from ptray.plan import Plan

    uri = store.resolve_tracking_uri()
    exp = _store_plan(uri, Plan(study="S", tasks=("cb",), seeds=(0,)))
    store.client(uri).delete_experiment(exp)
    want = (f"study 'S' is in MLflow experiment 'ptray-S', which (id {exp}) at {uri} was deleted; restore it with "
            f"`MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id {exp}`, or purge it for good "
            f"with `mlflow gc --backend-store-uri {uri} --experiment-ids {exp}` and start anew (or pass another "
            f"--experiment)")
    assert _study(capsys, "--resume", "--study", "S", "--dry-run")[::2] == (2, f"error: {want}\n")
    assert _study(capsys, "--study", "S", "--tasks", "cb", "--seeds", "0", "--smoke")[::2] == (2, f"error: {want}\n")
    code, err = _analyse(capsys, "--experiment", "ptray-S", "--tracking-uri", uri)
    assert code == 2 and err.startswith(f"error: MLflow experiment 'ptray-S' (id {exp}) at {uri} was deleted; "
                                        f"restore it with `MLFLOW_TRACKING_URI=")


# ---------------------------------------------------------------------------------------------------------------
# 18. loose ends of a chaos run


def test_a_replaced_run_is_finished_as_killed_before_it_is_deleted(tmp_path):
    mc = store.client(f"sqlite:///{tmp_path / 'm.db'}")
    exp = tracking.get_or_create_experiment(mc, "e")
    run = tracking.create_run(mc, exp, "cb-seed0", layout.run_tags("s", "train", "cb", 0))
    for epoch in (1, 2, 3):
        tracking.log_metrics(mc, run.info.run_id, {"eval_loss": 1.0 / epoch}, step=epoch)
    new_id = tracking.sync_history(mc, mc.get_run(run.info.run_id), [{"epoch": 1, "eval_loss": 1.0}])
    old = mc.get_run(run.info.run_id)
    assert (old.info.status, old.info.lifecycle_stage) == (layout.KILLED, "deleted")
    assert mc.get_run(new_id).info.status == layout.RUNNING
    # an evaluation that crashed: RUNNING -> KILLED and deleted; FAILED stays FAILED, deleted
    crashed = tracking.create_run(mc, exp, "baseline-none-on-cb", layout.run_tags("s", "baseline", target="cb"))
    failed = tracking.create_run(mc, exp, "baseline-none-on-cb", layout.run_tags("s", "baseline", target="cb"))
    mc.set_terminated(failed.info.run_id, layout.FAILED)
    assert tracking.replace_unfinished(mc, exp, "s", "baseline-none-on-cb") is None
    assert [(mc.get_run(r.info.run_id).info.status, mc.get_run(r.info.run_id).info.lifecycle_stage)
            for r in (crashed, failed)] == [(layout.KILLED, "deleted"), (layout.FAILED, "deleted")]


def _train_run(seed: int, **final):
    return SimpleNamespace(info=SimpleNamespace(status=layout.FINISHED, run_name=f"cb-seed{seed}"),
                           data=SimpleNamespace(tags=layout.run_tags("S", layout.TRAIN, "cb", seed), params={},
                                                metrics={layout.FINAL_PREFIX + k: v for k, v in final.items()}))


def test_the_best_seed_per_task_breaks_ties_by_a_stated_rule(monkeypatch):
    from ptray.plan import Plan
    from ptray.study import summary

    runs = [_train_run(3, exact_match=0.5, rank_accuracy=0.5, eval_loss=0.9),
            _train_run(1, exact_match=0.5, rank_accuracy=0.5, eval_loss=0.7),
            _train_run(2, exact_match=0.5, rank_accuracy=0.5, eval_loss=0.7),
            _train_run(0, exact_match=0.25, rank_accuracy=1.0, eval_loss=0.1)]
    plan = Plan(study="S", tasks=("cb",), seeds=(0, 1, 2, 3), group_size=1)
    chosen = set()
    for order in (runs, runs[::-1], runs[1:] + runs[:1]):
        monkeypatch.setattr(tracking, "search_study_runs", lambda *a, order=order, **k: list(order))
        chosen.add(summary.summarize(None, "0", plan)["best"]["cb"]["seed"])
    assert chosen == {"1"}  # equal exact match and rank accuracy; eval loss ties 1 and 2; the lower seed
    assert summary.BEST_RULE == "highest exact match, then rank accuracy; ties: lowest eval loss, then lowest seed"


def test_a_tracking_server_outage_is_said_once_and_so_is_its_end():
    answers = iter([True, False, False, False, True, True, False])
    said: list[str] = []
    watch = store.ServerWatch("http://10.0.0.5:5000", probe=lambda: next(answers), say=said.append)
    for _ in range(7):
        watch.check()
    assert len(said) == 3
    assert said[0] == ("the MLflow tracking server at http://10.0.0.5:5000 does not answer; the study waits for it "
                       "(MLflow retries its requests; trials may fail and be retried)")
    assert said[1].startswith("the MLflow tracking server at http://10.0.0.5:5000 answers again after ")
    assert said[1].endswith(" s; the study goes on")
    with store.ServerWatch("sqlite:////x.db", interval=0.01, probe=lambda: False, say=said.append) as local:
        time.sleep(0.05)
    assert local._thread is None and len(said) == 3  # a local store has no outage to watch


def test_a_live_watch_sees_a_closed_port(capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with store.ServerWatch(f"http://127.0.0.1:{port}", interval=0.05):
        time.sleep(0.5)
    err = capsys.readouterr().err
    assert err.count("does not answer; the study waits for it") == 1


def test_ray_processes_left_by_a_killed_driver_are_found_and_stopped(tmp_path, monkeypatch):
    session = str(tmp_path / "session_2026-12-02_00-00-00_000000_1")
    sleeper = "import time; time.sleep(120)"
    # an agent whose session has no GCS server or raylet left, and one of a session that still runs
    orphan = subprocess.Popen([sys.executable, "-c", sleeper, "ray/dashboard/agent.py", f"--session-dir={session}"])
    live = str(tmp_path / "session_live")
    raylet = subprocess.Popen(["bash", "-c", f'exec -a {tmp_path}/raylet {sys.executable} -c "{sleeper}" '
                                             f'--session_dir={live} ray'])
    agent = subprocess.Popen([sys.executable, "-c", sleeper, "ray/dashboard/agent.py", f"--session-dir={live}"])
    try:
        time.sleep(0.5)
        found = cluster.leftover_ray_processes()
        assert found.get(session) == [orphan.pid]
        assert live not in found
        mine = {session: found[session]}
        monkeypatch.setattr(cluster, "leftover_ray_processes", lambda: mine)  # never stop anyone else's
        said: list[str] = []
        assert cluster.clear_leftover_ray(say=said.append) == 1
        assert orphan.wait(timeout=10) == -15
        assert said == [f"stopped 1 Ray process(es) left running by a killed driver (session {session})"]
    finally:
        for proc in (orphan, raylet, agent):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
