"""Faults a new user meets (issue 32): a broken data file on the Ray path, a full disk, artifacts away from their
runs, two studies on one tracking store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ptray.errors import PtrayError
from ptray.study import fingerprint, store, tracking


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "here"


def _study(capsys, *argv) -> tuple[int, str, str]:
    from ptray.study.driver import main

    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


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
