"""Every output location is checked before any work: a run folder or a prepared model folder under a regular file,
or in a folder without write permission, is refused in one line at once, not after hours of training."""

import os

import pytest

from ptray.errors import PtrayError
from ptray.files import check_output_folder
from ptray.training.train import main


def test_run_folder_under_a_file_is_refused_before_training(tiny_model_dir, data_dir, tmp_path, capsys, monkeypatch):
    """The issue's case: --output-dir under a regular file trained two epochs, then a FileExistsError traceback."""
    import ptray.training.train as train_module

    def no_training(cfg):
        raise AssertionError("training started although the output folder cannot be written")

    monkeypatch.setattr(train_module, "train", no_training)
    blocker = tmp_path / "results"
    blocker.write_text("a file, not a folder")
    code = main(["--task", "cb", "--seed", "0", "--model", str(tiny_model_dir), "--data-dir", str(data_dir),
                 "--output-dir", str(blocker / "run1"), "--max-epochs", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: --output-dir {str(blocker / 'run1')!r} lies under {str(blocker)!r}, which "
                                 f"is a file, not a folder; choose another --output-dir"]


def test_each_kind_of_unusable_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(PtrayError, match=r"^--out '.*/f' exists and is not a folder; choose another --out$"):
        check_output_folder(tmp_path / "f", "--out")
    with pytest.raises(PtrayError, match=r"lies under '.*/f', which is a file"):
        check_output_folder(tmp_path / "f" / "a" / "b", "--out")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(PtrayError, match="already holds a report; choose a new --out or pass --overwrite"):
        check_output_folder(full, "--out", holds="a report")
    assert check_output_folder(full, "--out", overwrite=True) == full
    assert check_output_folder(full, "--out", reusable=lambda p: (p / "x").is_file()) == full
    assert check_output_folder(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # nothing created by a check


def test_a_folder_without_write_permission_is_refused(tmp_path, monkeypatch):
    """Tests run as root here, which may write anywhere: the permission answer is the operating system's, faked."""
    import ptray.files

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(ptray.files.os, "access", lambda p, mode: False if str(p) == str(locked) else real(p, mode))
    with pytest.raises(PtrayError, match=r"--output-dir '.*/locked/run' cannot be written: no write permission on "
                                         r"'.*/locked'; choose another --output-dir"):
        check_output_folder(locked / "run", "--output-dir")


@pytest.mark.parametrize("flag, setup, message", [
    ("--storage-path", "file", "lies under '{blocker}', which is a file, not a folder; choose another --storage-path"),
    ("--analysis-dir", "full", "already holds files; choose a new --analysis-dir or empty it"),
])
def test_study_output_folders_are_checked_before_anything_starts(flag, setup, message, data_dir, tmp_path, capsys):
    from ptray.study.driver import main

    blocker = tmp_path / "blocker"
    if setup == "file":
        blocker.write_text("a file")
        value = blocker / "results"
    else:
        blocker.mkdir()
        (blocker / "notes.txt").write_text("mine")
        value = blocker
    code = main(["--smoke", "--data-dir", str(data_dir), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                 flag, str(value)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message.format(blocker=blocker) in err[0]
    assert not (tmp_path / "m.db").exists()  # nothing started
