"""Shared fixtures: the real SuperGLUE files from ../shared and a tiny BLOOM built offline once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    env = os.environ.get("PTRAY_DATA_DIR")
    # absolute: tests run the sweep in subprocesses with other working directories
    return (Path(env) if env else ROOT.parent / "shared" / "data" / "superglue").resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = _data_dir()
    if not (path / "CB" / "train.jsonl").is_file():
        pytest.fail(f"SuperGLUE data not found at {path}; set PTRAY_DATA_DIR to the folder with CB/, RTE/, ...")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from ptray.lm.tiny_model import build

    return build(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, tokenizer) of the tiny BLOOM, fp32, eval mode."""
    from ptray.lm.load import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working folder (tmp_path/here) with no tracking store, Ray address or file-store switch from the
    environment: where a study's default store (./mlflow.db) and outputs land."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "here"
