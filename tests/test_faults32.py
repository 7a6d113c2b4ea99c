"""Faults a new user meets (issue 32): a broken data file on the Ray path, a full disk, artifacts away from their
runs, two studies on one tracking store."""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_study_faults import _study

from ptray.errors import PtrayError
from ptray.study import fingerprint, store, tracking


def _copy_data(data_dir: Path, to: Path, tasks=("CB",)) -> Path:
    for task in tasks:
        shutil.copytree(data_dir / task, to / task)
    return to


def _cut(path: Path, line: int) -> None:
    """Keep ``line - 1`` whole lines and the first 20 characters of the next: a file cut mid-line."""
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: line - 1]) + lines[line - 1][:20])


# ---------------------------------------------------------------------------------------------------------------
# 1. a broken data file on the Ray path


def test_a_cut_data_file_is_one_line_before_a_ray_study_starts(workdir, data_dir, capsys):
    data = _copy_data(data_dir, workdir / "data")
    _cut(data / "CB" / "train.jsonl", 25)
    want = f"error: {data / 'CB' / 'train.jsonl'}:25: not valid JSON (Unterminated string starting at column 13)\n"
    argv = ("--smoke", "--tasks", "cb", "--seeds", "0", "--data-dir", str(data))
    assert _study(capsys, "--study", "S", *argv)[::2] == (2, want)
    assert not (workdir / "mlflow.db").exists()  # nothing started: not even the store
    assert _study(capsys, "--study", "S", "--dry-run", *argv)[::2] == (2, want)
    assert _study(capsys, "--study", "S", "--local", str(workdir / "l"), *argv)[::2] == (2, want)
    assert not (workdir / "l").exists()


def test_a_broken_validation_file_of_a_transfer_target_is_refused_too(workdir, data_dir, capsys):
    data = _copy_data(data_dir, workdir / "data", ("CB", "RTE"))
    (data / "RTE" / "val.jsonl").write_text('{"premise": "p", "hypothesis": "h", "idx": 0}\n')
    code, _, err = _study(capsys, "--study", "S", "--smoke", "--tasks", "cb", "--targets", "rte", "--seeds", "0",
                          "--data-dir", str(data), "--dry-run")
    assert (code, err) == (2, f"error: {data / 'RTE' / 'val.jsonl'}:1: field 'label' is missing (the val split "
                              f"must be labeled)\n")


def _stored_plan_with_data(workdir: Path, data: Path):
    from ptray.config import TrainConfig
    from ptray.plan import Plan
    from ptray.study import preflight
    from ptray.study.bundle import Bundle

    plan = Plan(study="S", tasks=("cb",), seeds=(0,), group_size=1, smoke=True, tiny_model=True,
                train=TrainConfig(data_dir=str(data), max_epochs=1, max_train_examples=8, max_eval_examples=8,
                                  max_length=128))
    bundle = Bundle.pack(data, preflight.data_files(plan))
    plan.data_digest, plan.data_files = bundle.digest, bundle.file_digests()
    uri = store.resolve_tracking_uri()
    mc = store.open_store(uri)
    tracking.write_plan(mc, tracking.get_or_create_experiment(mc, "ptray-S"), "S", plan.to_json())
    return plan


def test_a_resume_refused_for_changed_data_names_the_file_and_the_ways_forward(workdir, data_dir, capsys):
    from ptray.study import preflight
    from ptray.study.bundle import Bundle

    data = _copy_data(data_dir, workdir / "data")
    plan = _stored_plan_with_data(workdir, data)
    path = data / "CB" / "train.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))  # one record less: still valid
    code, _, err = _study(capsys, "--resume", "--study", "S")
    assert (code, err) == (2, f"error: --resume of study 'S': the data files in {data} changed since the study "
                              f"started: CB/train.jsonl changed; restore them, start anew with another --study (the "
                              f"same flags without --resume), or pass --accept-new-data to finish this study on the "
                              f"new files (its finished runs keep what the old files gave)\n")
    new = Bundle.pack(data, preflight.data_files(plan))
    assert fingerprint.check_same_data(plan, new.digest, new.file_digests(), accept=True) is True
    assert "--accept-new-data: study 'S' goes on with the data files" in capsys.readouterr().out
    assert fingerprint.check_same_data(plan, plan.data_digest, plan.data_files, accept=False) is False
    with pytest.raises(PtrayError, match=r"differ from those the study started with \(\w+ != \w+\)"):
        plan.data_files = None  # a plan stored before each file's digest was recorded
        fingerprint.check_same_data(plan, new.digest, new.file_digests(), accept=False)


# ---------------------------------------------------------------------------------------------------------------
# 3. a full disk: one line naming the folder and the free space, nothing half-written, a resume that works


def _full(monkeypatch, free: int = 12_345) -> str:
    """The disk reports ``free`` bytes; returns how the message spells them."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9 - free, free=free))
    return "12.3 KB free"


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _no_space(folder, free: str) -> str:
    return (f"no space left on the disk of {folder} ({free}); nothing was left half-written: free some space (or "
            f"choose another folder) and run the command again (a study: with --resume)")


def test_a_full_disk_in_a_whole_folder_keeps_the_old_one_and_says_so_in_one_line(tmp_path, monkeypatch):
    from ptray.files import atomic_folder, write_json

    free = _full(monkeypatch)
    out = tmp_path / "ckpt"
    with atomic_folder(out) as tmp:
        (tmp / "state.pt").write_text("epoch 1")
    with pytest.raises(PtrayError) as err, atomic_folder(out) as tmp:
        (tmp / "state.pt").write_text("epoch 2, cut")
        _enospc()
    assert str(err.value) == _no_space(out, free)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no partial sibling left
    assert (out / "state.pt").read_text() == "epoch 1"  # the last whole checkpoint stays
    write_json(tmp_path / "plan.json", {"a": 1})
    real = Path.write_text

    def cut(self, text, *args, **kwargs):  # writes half, then the disk is full
        real(self, text[: len(text) // 2])
        _enospc()

    monkeypatch.setattr(Path, "write_text", cut)
    with pytest.raises(PtrayError) as err:
        write_json(tmp_path / "plan.json", {"a": 2})
    assert str(err.value) == _no_space(tmp_path, free)
    monkeypatch.setattr(Path, "write_text", real)
    assert json.loads((tmp_path / "plan.json").read_text()) == {"a": 1}  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "plan.json"]


def test_a_checkpoint_on_a_full_disk_is_one_line_not_torchs_and_the_study_resumes(tiny_model_dir, data_dir,
                                                                                  tmp_path, monkeypatch):
    from ptray.config import TrainConfig
    from ptray.plan import Plan
    from ptray.study.local import finished_runs, run_dir, run_local

    plan = Plan(study="full", tasks=("cb",), seeds=(0,),
                train=TrainConfig(model=str(tiny_model_dir), data_dir=str(data_dir), max_epochs=3,
                                  max_train_examples=8, max_eval_examples=8, max_length=128, batch_size=4))
    free = _full(monkeypatch)
    real, calls = Path.write_bytes, []

    def second_checkpoint_fails(self, data):
        if self.name == "state.pt":
            calls.append(self)
            if len(calls) == 2:
                real(self, data[:64])
                _enospc()
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", second_checkpoint_fails)
    with pytest.raises(PtrayError) as err:
        run_local(plan, tmp_path / "s", progress=False)
    ckpt = tmp_path / "s" / "checkpoints" / "cb-seed0"
    assert str(err.value) == _no_space(ckpt, free)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["cb-seed0"]  # epoch 1's, whole; no partial copy
    assert json.loads((ckpt / "run.json").read_text())["epoch"] == 1
    monkeypatch.setattr(Path, "write_bytes", real)  # space freed
    assert run_local(plan, tmp_path / "s", resume=True, progress=False)["train"] == 1
    history = json.loads((run_dir(tmp_path / "s", "cb-seed0") / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]  # every epoch once
    assert "cb-seed0" in finished_runs(tmp_path / "s")


def test_a_full_disk_while_the_smoke_model_is_written_leaves_no_half_model(workdir, data_dir, capsys,
                                                                           monkeypatch):
    from transformers import PreTrainedTokenizerFast

    free = _full(monkeypatch)
    real = PreTrainedTokenizerFast.save_pretrained

    def half_tokenizer(self, folder, *args, **kwargs):  # the weights are written, the tokenizer's first file cut
        Path(folder, "tokenizer.json").write_text('{"version": ')
        _enospc()

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", half_tokenizer)
    argv = ["--tasks", "cb", "--seeds", "0", "--max-epochs", "1", "--max-train-examples", "8",
            "--max-eval-examples", "8", "--data-dir", str(data_dir), "--no-analysis"]
    code, _, err = _study(capsys, "--smoke", "--study", "full", "--local", "s", *argv)
    study = (workdir / "s").resolve()
    # (after transformers' progress bar, when no earlier test has turned it off)
    assert (code, err.splitlines()[-1]) == (2, f"error: {_no_space(study / 'tiny-model', free)}")
    assert "Traceback" not in err and err.count("error:") == 1
    # no half model, no partial copy: the plan and the folder's lock file (released with the process that held it)
    assert sorted(p.name for p in study.iterdir()) == [".ptray-lock", "plan.json"]
    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", real)  # space freed
    code, out, _ = _study(capsys, "--resume", "--local", "s", "--no-analysis")
    assert code == 0 and f"local study full: 1 train runs and 2 evaluations written to {study}" in out
    exp = store.client(store.resolve_tracking_uri()).get_experiment_by_name("ptray-full").experiment_id
    assert f"published 3 runs into MLflow experiment 'ptray-full' at sqlite:///{workdir / 'mlflow.db'} (artifacts " \
           f"in {workdir / 'mlflow-artifacts' / exp})" in out  # item 8: beside the store, said where


# ---------------------------------------------------------------------------------------------------------------
# 8. artifacts beside the SQLite store, not in ./mlruns of whatever folder the experiment was created from


def test_a_sqlite_stores_artifacts_live_beside_it_whatever_the_working_directory(workdir, capsys):
    from ptray import layout
    from ptray.config import TrainConfig
    from ptray.plan import Plan
    from ptray.study.summary import render_summary

    uri = store.resolve_tracking_uri(f"sqlite:///{workdir.parent / 'db' / 'm.db'}")
    mc = store.open_store(uri)
    exp = tracking.get_or_create_experiment(mc, "e")
    assert tracking.get_or_create_experiment(mc, "e") == exp  # found again, not created twice
    where = workdir.parent / "db" / "m-artifacts" / exp
    assert tracking.artifact_location(mc, exp) == str(where)
    run = tracking.create_run(mc, exp, "cb-seed0", layout.run_tags("s", layout.TRAIN, "cb", 0))
    (workdir / "out").mkdir()
    (workdir / "out" / "metrics.json").write_text("{}")
    tracking.log_finished_run(mc, run.info.run_id, {}, {}, workdir / "out")
    assert (where / run.info.run_id / "artifacts" / "metrics.json").is_file()
    assert not (workdir / "mlruns").exists()  # nothing in the working directory, which the user may delete
    plan = Plan(study="s", tasks=("cb",), seeds=(0,), train=TrainConfig())
    summary = {"train_done": 1, "train_stopped": [], "train_failed": [], "eval_done": 2, "eval_expected": 2,
               "best": {}, "searched": {}}
    lines = render_summary(summary, plan, "e", exp, uri, "t", "off", [], 1.0, artifacts=str(where)).splitlines()
    assert lines[lines.index(f"  MLflow     experiment 'e' (id {exp}) at {uri}") + 1] == \
        f"             artifacts in {where}"
    server = store.client("http://127.0.0.1:9")  # a server chooses its own artifact root: nothing derived here
    assert store.artifact_root(store.client_uri(server)) is None


# ---------------------------------------------------------------------------------------------------------------
# 2. two studies on one tracking store: its first creation serialised, one driver per study


OPEN_WHEN_TOLD = """
import sys, time
from pathlib import Path
from ptray.study import store
folder = Path(sys.argv[2])
(folder / f"ready-{sys.argv[3]}").touch()
while not (folder / "go").exists():
    time.sleep(0.01)
try:
    store.open_store(sys.argv[1])
    print("ok")
except Exception as err:
    print(type(err).__name__, err)
"""


def test_studies_started_together_on_a_new_sqlite_file_all_open_it(tmp_path):
    """Without the lock, two or three processes creating MLflow's tables at once fail ("table latest_metrics already
    exists", "duplicate column name: step")."""
    import os
    import subprocess
    import sys
    import time

    uri = f"sqlite:///{tmp_path / 'new.db'}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_WHEN_TOLD, uri, str(tmp_path), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for i in range(3)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("ready-*"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()  # all three imported: they open the new store together
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert outs == ["ok", "ok", "ok"]


@pytest.fixture
def quick_lease(monkeypatch):
    from ptray.study import lease

    monkeypatch.setattr(lease, "SETTLE_S", 0.05)
    return lease


def _exp(tmp_path):
    mc = store.client(f"sqlite:///{tmp_path / 'm.db'}")
    return mc, tracking.get_or_create_experiment(mc, "e")


def test_a_studys_lease_refuses_a_second_driver_until_released_or_stale(tmp_path, quick_lease, monkeypatch):
    import socket
    import subprocess
    import time

    from ptray import layout

    mc, exp = _exp(tmp_path)
    first = quick_lease.StudyLease(mc, exp, "S").acquire()
    second = quick_lease.StudyLease(mc, exp, "S")
    with pytest.raises(PtrayError) as err:
        second.acquire()
    assert str(err.value) == (
        f"study 'S' is running: its driver (pid {first.me['pid']} on {socket.gethostname()}) renewed its lease 0 s "
        f"ago; wait for it to finish, or stop it; a driver stopped without ending (kill -9, a lost machine) frees the "
        f"study 120 s after its last renewal, then --resume continues it")
    assert quick_lease.StudyLease(mc, exp, "other-study").acquire()  # another study of the experiment: its own
    first.release()
    assert layout.LEASE_TAG_PREFIX + "S" not in mc.get_experiment(exp).tags
    second.acquire().release()

    def held(host, pid, age, study="S"):
        mc.set_experiment_tag(exp, layout.LEASE_TAG_PREFIX + study, json.dumps(
            {"owner": "x", "host": host, "pid": pid, "heartbeat": time.time() - age}))

    held("elsewhere", 1, 30)  # another machine's driver, renewed 30 s ago: running
    with pytest.raises(PtrayError, match=r"pid 1 on elsewhere\) renewed its lease 30 s ago"):
        quick_lease.StudyLease(mc, exp, "S").acquire()
    held("elsewhere", 1, 121)  # no renewal for longer than STALE_S: its driver is gone
    quick_lease.StudyLease(mc, exp, "S").acquire().release()
    gone = subprocess.Popen(["true"])
    gone.wait()
    held(socket.gethostname(), gone.pid, 1)  # a driver of this host that no longer runs (kill -9): free at once
    lease = quick_lease.StudyLease(mc, exp, "S").acquire()
    # two drivers that both wrote the lease: the one overwritten while it settled gives way
    monkeypatch.setattr(quick_lease.StudyLease, "_write", lambda self: held("elsewhere", 7, 0, "T"))
    with pytest.raises(PtrayError, match=r"pid 7 on elsewhere"):
        quick_lease.StudyLease(mc, exp, "T").acquire()
    lease.release()


def test_a_second_driver_of_a_running_study_is_refused_before_it_starts_anything(workdir, data_dir, capsys,
                                                                                  quick_lease):
    import time

    from ptray import layout

    data = _copy_data(data_dir, workdir / "data")
    _stored_plan_with_data(workdir, data)
    mc = store.client(store.resolve_tracking_uri())
    exp = mc.get_experiment_by_name("ptray-S").experiment_id
    running = json.dumps({"owner": "x", "host": "elsewhere", "pid": 4242, "heartbeat": time.time() - 5})
    mc.set_experiment_tag(exp, layout.LEASE_TAG_PREFIX + "S", running)
    code, _, err = _study(capsys, "--resume", "--study", "S")
    assert code == 2 and re.fullmatch(r"error: study 'S' is running: its driver \(pid 4242 on elsewhere\) renewed "
                                      r"its lease \d+ s ago; wait for it to finish, or stop it; .*", err.strip())
    assert mc.get_experiment(exp).tags[layout.LEASE_TAG_PREFIX + "S"] == running  # untouched
    import ray

    assert not ray.is_initialized()  # nothing started


@pytest.mark.slow
def test_two_drivers_of_one_study_the_second_refused_and_nothing_logged_twice(workdir, data_dir, capsys):
    import os
    import subprocess
    import sys
    import time
    from collections import Counter

    from ptray import layout

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"}
    uri = store.resolve_tracking_uri()
    argv = ["--study", "twice", "--tasks", "cb", "--seeds", "0", "--max-epochs", "1", "--max-train-examples", "8",
            "--max-eval-examples", "8", "--data-dir", str(data_dir), "--no-analysis"]
    with open(workdir / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, str(root / "sweeps" / "all.py"), "--smoke", *argv], cwd=workdir,
                                 env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, exp = time.monotonic() + 600, None  # Ray starts slowly on a busy machine
        while exp is None or layout.PLAN_TAG_PREFIX + "twice" not in exp.tags:  # running: its plan is stored
            assert first.poll() is None, (workdir / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first driver did not store its plan in 10 minutes"
            time.sleep(0.5)
            # open_store: through the lock the driver creates the store under (a bare client could race its tables)
            exp = store.open_store(uri).get_experiment_by_name("ptray-twice") if (workdir / "mlflow.db").exists() \
                else None
        code, _, err = _study(capsys, "--resume", *argv)
        assert code == 2 and err.startswith("error: study 'twice' is running: its driver (pid "), err
        assert first.wait(timeout=600) == 0, (workdir / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    mc = store.client(uri)
    exp = mc.get_experiment_by_name("ptray-twice")
    assert layout.LEASE_TAG_PREFIX + "twice" not in exp.tags  # released at the end
    runs = tracking.search_study_runs(mc, exp.experiment_id, "twice")
    assert Counter(r.data.tags[layout.TAG_KIND] for r in runs) == {"train": 1, "transfer": 1, "baseline": 1}
    train = next(r for r in runs if r.data.tags[layout.TAG_KIND] == "train")
    assert [m.step for m in mc.get_metric_history(train.info.run_id, "eval_loss")] == [1]  # every epoch once
