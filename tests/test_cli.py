"""`python -m ptray.train` and `python -m ptray.lm.tiny_model`: a real run, and one clear line per bad input."""

import json
import subprocess
import sys

import pytest

import ptray.lm.load
from ptray.training.train import main


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _args(data_dir, model, out, *extra):
    return ["--task", "cb", "--seed", "0", "--model", model, "--data-dir", data_dir, "--output-dir", out,
            "--max-epochs", "1", "--max-train-examples", "16", "--max-eval-examples", "8", *extra]


def _assert_one_line_error(code, err, pattern, out_dir):
    import re

    assert code == 2
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert not out_dir.exists()


def test_cli_end_to_end_subprocess(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "ptray.train", *_args(data_dir, tiny_model_dir, out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1/1" in proc.stdout and "done: cb seed 0" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and metrics["num_eval_examples"] == 8
    assert (out / "prompt" / "adapter_model.safetensors").is_file() and (out / "config.json").is_file()


def test_unknown_task(tiny_model_dir, data_dir, tmp_path, capsys):
    argv = _args(data_dir, tiny_model_dir, tmp_path / "o")
    argv[1] = "mnli"
    _assert_one_line_error(*_run(argv, capsys)[::2], r"unknown task 'mnli'; valid tasks: cb, rte, copa, wsc",
                           tmp_path / "o")


def test_missing_data_dir(tiny_model_dir, tmp_path, capsys):
    code, _, err = _run(_args(tmp_path / "nodata", tiny_model_dir, tmp_path / "o"), capsys)
    _assert_one_line_error(code, err, r"data directory .* does not exist", tmp_path / "o")


def test_missing_split(tiny_model_dir, data_dir, tmp_path, capsys):
    (tmp_path / "d" / "CB").mkdir(parents=True)
    (tmp_path / "d" / "CB" / "train.jsonl").write_text((data_dir / "CB" / "train.jsonl").read_text())
    code, _, err = _run(_args(tmp_path / "d", tiny_model_dir, tmp_path / "o"), capsys)
    _assert_one_line_error(code, err, r"split file '.*CB/val.jsonl' is missing", tmp_path / "o")


@pytest.mark.parametrize("line,pattern", [
    ('{"premise": "a", "hypothesis": "b", "label": "entailment", "idx": 5', r"CB/train.jsonl:3: not valid JSON"),
    ('{"premise": "a", "hypothesis": "b", "label": "maybe", "idx": 5}',
     r"CB/train.jsonl:3: field 'label': label 'maybe' is not one of cb's labels"),
])
def test_broken_record(tiny_model_dir, data_dir, tmp_path, capsys, line, pattern):
    folder = tmp_path / "d" / "CB"
    folder.mkdir(parents=True)
    good = (data_dir / "CB" / "train.jsonl").read_text().splitlines()[:2]
    (folder / "train.jsonl").write_text("\n".join(good + [line]) + "\n")
    (folder / "val.jsonl").write_text((data_dir / "CB" / "val.jsonl").read_text())
    code, _, err = _run(_args(tmp_path / "d", tiny_model_dir, tmp_path / "o"), capsys)
    _assert_one_line_error(code, err, pattern, tmp_path / "o")


def test_model_path_missing(data_dir, tmp_path, capsys):
    code, _, err = _run(_args(data_dir, str(tmp_path / "no-model"), tmp_path / "o"), capsys)
    _assert_one_line_error(code, err, r"model path '.*no-model' does not exist", tmp_path / "o")


def test_hub_unreachable(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ptray.lm.load, "_hub_reachable", lambda timeout=3.0: False)
    code, _, err = _run(_args(data_dir, "bigscience/bloomz-560m", tmp_path / "o"), capsys)
    _assert_one_line_error(code, err, r"cannot reach the Hugging Face Hub to download 'bigscience/bloomz-560m'.*"
                                      r"pass --model DIR", tmp_path / "o")


@pytest.mark.parametrize("flag,value,pattern", [
    ("--max-epochs", "0", r"argument --max-epochs: must be a positive integer, got 0"),
    ("--batch-size", "-4", r"argument --batch-size: must be a positive integer, got -4"),
    ("--lr", "0", r"argument --lr: must be a positive number, got 0"),
    ("--lr", "abc", r"argument --lr: expected a positive number, got 'abc'"),
])
def test_non_positive_numbers(tiny_model_dir, data_dir, tmp_path, flag, value, pattern, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in _args(data_dir, tiny_model_dir, tmp_path / "o", flag, value)])
    _assert_one_line_error(exc.value.code, capsys.readouterr().err, pattern, tmp_path / "o")


def test_output_dir_with_another_run(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    code, _, err = _run(_args(data_dir, tiny_model_dir, out), capsys)
    assert code == 2 and "already holds another run; choose a new --output-dir or pass --overwrite" in err
    assert (out / "metrics.json").read_text() == "{}"  # untouched
    code, _, _ = _run(_args(data_dir, tiny_model_dir, out, "--overwrite"), capsys)
    assert code == 0 and json.loads((out / "metrics.json").read_text())["epochs_run"] == 1


def test_tiny_model_refuses_non_empty_dir(tmp_path):
    from ptray.lm.tiny_model import main as tiny_main

    (tmp_path / "x").write_text("keep")
    assert tiny_main([str(tmp_path)]) == 2


def test_every_train_config_field_is_a_flag_with_the_dataclass_default():
    """The CLI is built from TrainConfig: each field is a flag, its help shows the dataclass's default, and the
    parsed flags build the same config as the dataclass would."""
    import dataclasses

    from ptray.cli import config_from_args
    from ptray.config import PromptInit, TrainConfig
    from ptray.training.train import build_parser

    parser = build_parser()
    dests = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= dests
    defaults = TrainConfig()
    help_text = " ".join(parser.format_help().split())
    for name in ("max_epochs", "patience", "batch_size", "max_length"):
        assert f"(default: {getattr(defaults, name)})" in help_text, name
    assert defaults.lr is None and "the optimizer's default: adam 3e-2" in help_text  # lr: per optimizer
    args = parser.parse_args(["--task", "rte", "--seed", "3", "--output-dir", "o", "--no-baselines", "--init",
                              "random", "--max-epochs", "7", "--lr", "0.5", "--num-tokens", "4"])
    assert config_from_args(TrainConfig, args) == TrainConfig(task="rte", seed=3, baselines=False,
                                                              init=PromptInit.RANDOM, max_epochs=7, lr=0.5,
                                                              num_tokens=4)
    assert config_from_args(TrainConfig, parser.parse_args(["--task", "cb", "--seed", "0", "--output-dir", "o"])) \
        == TrainConfig(task="cb", seed=0)
