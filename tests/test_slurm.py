"""``ptray slurm``: the input it refuses before anything is written or submitted (fake ``sbatch``/``sinfo`` on PATH,
for these checks only), the script it writes, and, marked ``slurm``, the smoke study as real SLURM batch jobs on a
one-node cluster that ``make test-slurm`` starts (tests/slurm/with_slurm.sh): a job that finishes the study, and a
job warned before its time limit (requeued), cancelled and resubmitted, which finishes with every run FINISHED and
no epoch missing or logged twice."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest

from ptray.command import main as ptray
from ptray.study.slurm import gres_gpus

ROOT = Path(__file__).resolve().parents[1]


def fake_slurm(folder: Path, sinfo: str | None = "debug*|1|2|(null)") -> Path:
    """A folder with a fake ``sbatch`` (records its arguments, answers job 123) and, unless None, a fake ``sinfo``
    printing ``sinfo`` (``partition|nodes|cpus|gres`` lines)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" > {folder}/sbatch.args\necho 123\n")
    if sinfo is not None:
        lines = " ".join(f"'{line}'" for line in sinfo.splitlines())  # printf: a shell builtin, PATH has no cat
        (folder / "sinfo").write_text(f"#!/bin/sh\nprintf '%s\\n' {lines}\n")
    for f in folder.iterdir():
        f.chmod(0o755)
    return folder


@pytest.fixture
def login(tmp_path, monkeypatch):
    """A login node: the working directory a temporary folder, the fake SLURM commands alone on PATH."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    bin_dir = fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(bin_dir))
    return tmp_path


def refused(capsys, argv: list[str], message: str, where: Path) -> None:
    assert ptray(["slurm", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(message, err), err
    assert not (where / "slurm").exists()  # nothing written
    assert not (where / "bin" / "sbatch.args").exists()  # nothing submitted


STUDY = ["--", "--smoke", "--tasks", "cb", "--seeds", "0", "--study", "s1"]


def test_no_sbatch_on_path_is_one_line(login, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(login / "nothing"))
    refused(capsys, STUDY, r"sbatch is not on PATH: run ptray slurm on a login node", login)


@pytest.mark.parametrize("flags,message", [
    (["--partition", "gpu"], r"--partition gpu: the cluster has no such partition \(it has: debug\)"),
    (["--gpus-per-node", "1"], r"--gpus-per-node 1: partition debug has no GPUs"),
    (["--nodes", "3"], r"--nodes 3: partition debug has 1 node"),
    (["--cpus-per-node", "64"], r"--cpus-per-node 64: no node of partition debug has more than 2 CPUs"),
])
def test_what_the_cluster_lacks_is_one_line(login, capsys, flags, message):
    refused(capsys, flags + STUDY, message, login)


def test_gpus_are_read_from_sinfos_gres(login, capsys):
    fake_slurm(login / "bin", "cpu*|4|32|(null)\ngpu|2|16|gpu:a100:4(S:0-1)\ngpu|2|16|gpu:2")
    refused(capsys, ["--partition", "gpu", "--gpus-per-node", "8", *STUDY],
            r"--gpus-per-node 8: partition gpu has at most 4 GPU\(s\) per node", login)
    assert ptray(["slurm", "--partition", "gpu", "--gpus-per-node", "4", "--nodes", "4", *STUDY]) == 0
    assert gres_gpus("(null)") == 0 and gres_gpus("gpu:a100:4(S:0-1),shard:8") == 4 and gres_gpus("gpu:2") == 2


@pytest.mark.parametrize("nodes,uri,message", [
    ("1", "sqlite:///mlflow.db", r"--tracking-uri sqlite:///mlflow.db is a relative path"),
    ("1", "mlruns", r"--tracking-uri mlruns is a relative path"),
    ("2", "sqlite:////shared/mlflow.db", r"is a file, which the job's 2 nodes cannot share"),
    ("2", "http://localhost:5000", r"--tracking-uri http://localhost:5000 is the loopback address"),
])
def test_a_tracking_uri_the_nodes_cannot_reach_is_one_line(login, capsys, nodes, uri, message):
    fake_slurm(login / "bin", "debug*|2|2|(null)")
    refused(capsys, ["--nodes", nodes, *STUDY, "--tracking-uri", uri], message, login)


@pytest.mark.parametrize("extra,message", [
    (["--resume"], r"--resume: the job sets it"),
    (["--address", "auto"], r"--address: the job sets it"),
    (["--tasks", "nope"], r"nope"),
    (["--storage-path", "rel/results"], r"--storage-path rel/results is relative"),
])
def test_bad_study_flags_are_one_line(login, capsys, extra, message):
    refused(capsys, STUDY + extra, message, login)


def test_a_declared_study_with_smoke_is_refused(login, capsys):
    refused(capsys, ["--", "--study", "init", "--smoke"], r"--smoke with the declared study 'init'", login)


def test_the_script_follows_rays_recipe_and_is_submitted(login, capsys, data_dir):
    assert ptray(["slurm", "--nodes", "1", "--time", "2:00:00", "--signal-lead", "120", "--sbatch=--account=lab",
                  "--submit", "--", "--smoke", "--tasks", "cb", "--seeds", "0", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    sid = re.search(r"submitted job 123; its output: \S+/slurm/(smoke-\d{8}-\d{6})/slurm-123.out", out).group(1)
    script = login / "slurm" / sid / "job.sbatch"
    assert (login / "bin" / "sbatch.args").read_text().split() == ["--parsable", str(script)]
    text = script.read_text()
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --exclusive", "#SBATCH --time=2:00:00",
                 "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --account=lab",
                 f"#SBATCH --chdir={login}", f"#SBATCH --output={login}/slurm/{sid}/slurm-%j.out"):
        assert line + "\n" in text
    # the smoke study's stamped id is fixed in the script, so that a resubmitted job resumes that study
    assert f"STUDY_ARGS=(--study {sid} --smoke" in text and f"--storage-path {login}/slurm/{sid}/ray_results)" in text
    assert "start --head" in text and 'start --address="$ADDRESS"' in text and "scontrol requeue" in text
    assert subprocess.run([shutil.which("bash", path="/bin:/usr/bin"), "-n", str(script)]).returncode == 0


# ---------------------------------------------------------------------------------------------------------------
# the real SLURM: `make test-slurm` starts munge, slurmctld and slurmd and sets PTRAY_TEST_SLURM


def _slurm_reason() -> str | None:
    if shutil.which("sbatch") is None:
        return "SLURM is not installed (make test-slurm installs it and starts a one-node cluster)"
    if os.environ.get("PTRAY_TEST_SLURM") != "1":
        return "no test SLURM cluster: run make test-slurm (it starts a one-node cluster for this test)"
    return None


needs_slurm = pytest.mark.skipif(_slurm_reason() is not None, reason=_slurm_reason() or "")


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _job_state(job: str) -> tuple[str, int]:
    """(JobState, restarts) of a job SLURM still knows."""
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    state = re.search(r"JobState=(\S+)", text)
    restarts = re.search(r"Restarts=(\d+)", text)
    return (state.group(1) if state else "GONE"), int(restarts.group(1)) if restarts else 0


def _wait_state(job: str, states: set[str], timeout: float, log: Path) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state, _ = _job_state(job)
        if state in states:
            return state
        tail = log.read_text()[-4000:] if log.exists() else ""
        assert time.monotonic() < deadline, f"job {job} still {state}: {tail}"
        time.sleep(2)


def _epochs_logged(db: Path) -> int:
    """Epoch metrics logged so far (read-only SQL: the job's MLflow server writes the file)."""
    if not db.exists():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            return con.execute("SELECT count(*) FROM metrics WHERE key = 'eval_loss'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _submit(workdir: Path, argv: list[str]) -> tuple[str, Path]:
    out = subprocess.run([sys.executable, "-m", "ptray", "slurm", "--cpus-per-node", str(os.cpu_count()),
                          "--ray-port", str(_free_port()), "--mlflow-port", str(_free_port()), "--submit", *argv],
                         cwd=workdir, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    match = re.search(r"submitted job (\d+); its output: (\S+);", out.stdout)
    return match.group(1), Path(match.group(2))


def _leftovers(*marks: str) -> list[str]:
    """Processes of this machine whose command line names one of ``marks`` (the job's folders)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(m in cmd for m in marks):
                found.append(f"{entry.name}: {cmd[:200]}")
    return found


def _scratch(job: str) -> Path:
    """The job's scratch folder (Ray's and MLflow's temporary files), which the job removes."""
    return Path(os.environ.get("TMPDIR") or "/tmp") / f"ptray-{job}"


def _runs(job_dir: Path, study: str):
    from ptray.study import store, tracking

    mc = store.client(f"sqlite:///{job_dir / 'mlflow.db'}")
    exp = mc.get_experiment_by_name(f"ptray-{study}")
    return mc, tracking.search_study_runs(mc, exp.experiment_id, study)


@pytest.mark.slurm
@needs_slurm
def test_the_smoke_study_as_a_slurm_job(tmp_path, data_dir):
    """One sbatch job runs the whole smoke study (Ray's head in the job, an MLflow server on its node, the analysis)
    and leaves no process behind."""
    job, log = _submit(tmp_path, ["--", "--smoke", "--tasks", "cb,copa", "--seeds", "0", "--study", "slurm-a",
                                  "--data-dir", str(data_dir)])
    assert _wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 900, log) == "COMPLETED", \
        log.read_text()[-4000:]
    text = log.read_text()
    assert "ptray: study slurm-a (new) on Ray at" in text and "2/2 trials done, 0 failed" in text
    mc, runs = _runs(log.parent, "slurm-a")
    kinds = Counter(r.data.tags["ptray.kind"] for r in runs)
    assert kinds == {"train": 2, "transfer": 4, "baseline": 2, "analysis": 1}, kinds
    assert all(r.info.status == "FINISHED" for r in runs)
    report = tmp_path / "outputs" / "analysis" / "ptray-slurm-a"
    assert (report / "report.html").is_file() and (report / "table1_norms.csv").is_file()
    assert not _leftovers(str(log.parent), f"ptray-{job}")
    assert not _scratch(job).exists()


@pytest.mark.slurm
@needs_slurm
def test_a_job_warned_requeued_cancelled_and_resubmitted_finishes_the_study(tmp_path, data_dir):
    """The job gets SLURM's time-limit warning (USR1, as --signal sends it) mid-study: it stops the study at its
    checkpoints and requeues itself; the requeued run resumes it and is cancelled (scancel) mid-study; the same
    script submitted again finishes it: every run FINISHED, each prompt's epochs 1..n logged once."""
    epochs = 6
    job, log = _submit(tmp_path, ["--", "--smoke", "--tasks", "cb", "--seeds", "0,1", "--study", "slurm-b",
                                  "--max-epochs", str(epochs), "--max-train-examples", "64", "--no-analysis",
                                  "--data-dir", str(data_dir)])
    job_dir = log.parent
    db = job_dir / "mlflow.db"

    def progress(more_than: int, timeout: float = 600) -> int:
        deadline = time.monotonic() + timeout
        while (n := _epochs_logged(db)) <= more_than:
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            assert _job_state(job)[0] in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING"), log.read_text()[-4000:]
            time.sleep(1)
        return n

    first = progress(0)
    assert first < 2 * epochs
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)  # what --signal=B:USR1@S sends
    deadline = time.monotonic() + 300
    while _job_state(job)[1] < 1:  # requeued: the same job id runs again
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(1)
    text = log.read_text()
    assert "SIGUSR1 received" in text and "requeued before the time limit" in text
    assert "study exited with status 130" in text  # stopped as Ctrl-C stops it, not killed
    second = progress(_epochs_logged(db))
    assert second < 4 * epochs
    subprocess.run(["scancel", job], check=True)
    _wait_state(job, {"CANCELLED", "GONE"}, 300, log)
    assert "ptray: study slurm-b --resume" in log.read_text()

    out = subprocess.run(["sbatch", "--parsable", str(job_dir / "job.sbatch")], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, check=True)
    again = out.stdout.strip().split(";")[0]
    last = job_dir / f"slurm-{again}.out"
    assert _wait_state(again, {"COMPLETED", "FAILED", "CANCELLED"}, 900, last) == "COMPLETED", last.read_text()[-4000:]
    assert "2/2 trials done, 0 failed" in last.read_text()

    from ptray.study import tracking

    mc, runs = _runs(job_dir, "slurm-b")
    kinds = Counter(r.data.tags["ptray.kind"] for r in runs)
    assert kinds == {"train": 2, "transfer": 2, "baseline": 1}, kinds
    assert len({r.info.run_name for r in runs}) == len(runs)
    assert all(r.info.status == "FINISHED" for r in runs)
    for run in (r for r in runs if r.data.tags["ptray.kind"] == "train"):
        n = int(run.data.metrics["final_epochs_run"])
        assert tracking.logged_epochs(mc, run.info.run_id) == list(range(1, n + 1))
        assert [m.step for m in mc.get_metric_history(run.info.run_id, "eval_loss")] == list(range(1, n + 1))
    for j in (job, again):
        assert not _leftovers(str(job_dir), f"ptray-{j}")
        assert not _scratch(j).exists()
