"""Issue 12: faults found by using ptray as users do. Each test is one reported example, with its right value or
message; the kind of fault is fixed everywhere (truncation that must end, seeds in range, paths, resume)."""

from __future__ import annotations

import json

import pytest

from ptray.batching import encode, encode_all
from ptray.data import load_split
from ptray.errors import PtrayError
from ptray.seeds import MAX_SEED, check_seed
from ptray.tasks import TASK_NAMES, get_task

# ---------------------------------------------------------------------------------------------------------------
# 1. truncation ends on multi-byte text (these examples hung `encode` at --max-length 64 with the tiny tokenizer)

REAL_CASES = {
    ("rte", 287): "Premise: The U.S. handed power on June 30 to Iraq\u00e2\nHypothesis: Transfer of power in Iraq on "
                  "June 30.\nAnswer:",  # the data's own mojibake (U+00E2 U+0080 U+0099): cut at a character
    ("rte", 505): "Premise: \nHypothesis: A two-day auction of property belonging to actress Katharine Hepburn "
                  "brought in\nAnswer:",
    ("rte", 654): "Premise: On Wednesday night people in the Bah\nHypothesis: A UFO might have been seen in "
                  "Turkey.\nAnswer:",
    ("wsc", 63): 'Text: Do you suppose that Peter is responsible for the captain\nDoes the pronoun "his" refer to '
                 '"Peter"?\nAnswer:',
}


@pytest.mark.parametrize("task_name,idx", sorted(REAL_CASES))
def test_real_examples_that_hung_truncation(tiny, data_dir, task_name, idx):
    _, tok = tiny
    task = get_task(task_name)
    example = next(e for e in load_split(task, "train", str(data_dir)) if e.idx == idx)
    enc = encode(task, example, tok, 64)
    assert enc.truncated and enc.length <= 64
    assert tok.decode(enc.source) == REAL_CASES[(task_name, idx)]


@pytest.mark.parametrize("task_name", TASK_NAMES)
def test_every_training_example_fits_max_length_64_without_replacement_characters(tiny, data_dir, task_name):
    _, tok = tiny
    task = get_task(task_name)
    encoded = encode_all(task, load_split(task, "train", str(data_dir)), tok, 64)
    assert max(e.length for e in encoded) <= 64
    assert sum(e.truncated for e in encoded) > len(encoded) // 2  # most are cut at 64 tokens
    assert not [e.idx for e in encoded if "\ufffd" in tok.decode(e.source)]


def test_train_cli_on_rte_at_max_length_64_finishes(tiny_model_dir, data_dir, tmp_path, capsys):
    # the reported command (its first 300 examples hold idx 287), one epoch
    from ptray.train import main

    out = tmp_path / "run"
    code = main(["--task", "rte", "--seed", "0", "--model", str(tiny_model_dir), "--data-dir", str(data_dir),
                 "--output-dir", str(out), "--max-train-examples", "300", "--max-eval-examples", "32",
                 "--max-length", "64", "--max-epochs", "1", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["num_train_examples"] == 300 and config["num_truncated"] > 150


def test_train_cli_refuses_a_max_length_below_the_answer_cue(tiny_model_dir, data_dir, tmp_path, capsys):
    from ptray.train import main

    out = tmp_path / "run"
    code = main(["--task", "cb", "--seed", "0", "--model", str(tiny_model_dir), "--data-dir", str(data_dir),
                 "--output-dir", str(out), "--max-length", "2", "--device", "cpu"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: --max-length 2 cannot hold cb's answer cue")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# 2. seeds: every CLI checks the range up front; derived seeds stay in range (tests/test_batching.py)

BIG = "184461906879890"  # passed the CLI, trained the baselines, then overflowed torch's manual_seed


def _one_line_exit_2(capsys, call, expected: str):
    with pytest.raises(SystemExit) as exc:
        call()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and expected in err, err


def test_train_cli_refuses_a_seed_out_of_range(tmp_path, capsys):
    from ptray.train import main

    _one_line_exit_2(capsys, lambda: main(["--task", "cb", "--seed", BIG, "--output-dir", str(tmp_path / "o")]),
                     f"argument --seed: must be a seed from 0 to {MAX_SEED} (2**32 - 1), got {BIG}")
    _one_line_exit_2(capsys, lambda: main(["--task", "cb", "--seed", "-1", "--output-dir", str(tmp_path / "o")]),
                     "argument --seed: must be a seed from 0 to")
    assert not (tmp_path / "o").exists()


def test_train_config_checks_the_seed_for_every_caller():
    from ptray.train import TrainConfig

    assert TrainConfig(seed=MAX_SEED).seed == MAX_SEED
    with pytest.raises(PtrayError, match=rf"seed must be an integer from 0 to {MAX_SEED} \(2\*\*32 - 1\), got {BIG}"):
        TrainConfig(seed=int(BIG))
    for bad in (-1, 2**32, 1.5, True):
        with pytest.raises(PtrayError):
            check_seed(bad)


def test_sweep_refuses_seeds_out_of_range_before_anything_starts(tmp_path, capsys, monkeypatch):
    from ptray.study import main, parse_seeds

    with pytest.raises(PtrayError, match=rf"--seeds '{BIG}': seed {BIG} is out of range; seeds are integers from "
                                         rf"0 to {MAX_SEED}"):
        parse_seeds(BIG)
    with pytest.raises(PtrayError, match=r"--seeds '0-1000000' names 1000001 seeds, more than 1000"):
        parse_seeds("0-1000000")  # refused before expanding the range
    with pytest.raises(PtrayError, match="out of range"):
        parse_seeds(f"0,1,{MAX_SEED + 1}")
    assert parse_seeds(f"0,{MAX_SEED}") == (0, MAX_SEED)
    monkeypatch.chdir(tmp_path)
    code = main(["--seeds", BIG, "--dry-run", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: --seeds '{BIG}': seed {BIG} is out of range; seeds are integers from 0 to " \
                                f"{MAX_SEED}\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("module", ["ptray.tiny_model", "analysis.__main__"])
def test_other_clis_with_a_seed_check_its_range(module, tmp_path, capsys):
    import importlib

    main = importlib.import_module(module).main
    argv = [str(tmp_path / "m")] if module == "ptray.tiny_model" else ["--experiment", "x"]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--seed", str(2**64)])
    assert exc.value.code == 2 and "must be a seed from 0 to 4294967295" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
