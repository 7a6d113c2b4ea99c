"""Issue 12: faults found by using ptray as users do. Each test is one reported example, with its right value or
message; the kind of fault is fixed everywhere (truncation that must end, seeds in range, paths, resume)."""

from __future__ import annotations

import json

import pytest
from test_study_faults import _study

from ptray.data.batching import encode, encode_all
from ptray.data.superglue import load_split
from ptray.data.tasks import TASK_NAMES, get_task
from ptray.errors import PtrayError
from ptray.seeds import MAX_SEED, check_seed

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
    from ptray.training.train import main

    out = tmp_path / "run"
    code = main(["--task", "rte", "--seed", "0", "--model", str(tiny_model_dir), "--data-dir", str(data_dir),
                 "--output-dir", str(out), "--max-train-examples", "300", "--max-eval-examples", "32",
                 "--max-length", "64", "--max-epochs", "1", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["num_train_examples"] == 300 and config["num_truncated"] > 150


def test_train_cli_refuses_a_max_length_below_the_answer_cue(tiny_model_dir, data_dir, tmp_path, capsys):
    from ptray.training.train import main

    out = tmp_path / "run"
    code = main(["--task", "cb", "--seed", "0", "--model", str(tiny_model_dir), "--data-dir", str(data_dir),
                 "--output-dir", str(out), "--max-length", "2", "--device", "cpu"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: --max-length 2 cannot hold cb's answer cue")
    assert not out.exists()


def test_train_cli_refuses_prompt_plus_max_length_beyond_the_models_positions(data_dir, tmp_path, capsys):
    # GPT-2 learns 64 position embeddings here: a longer input would index past them mid-run
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from ptray.data.tokens import token_ids
    from ptray.lm.tiny_model import build_tokenizer
    from ptray.training.train import main

    tok = build_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=1,
                               eos_token_id=2)).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "run"
    argv = ["--task", "cb", "--seed", "0", "--model", str(tmp_path / "gpt2"), "--data-dir", str(data_dir),
            "--output-dir", str(out), "--num-tokens", "10", "--max-train-examples", "4", "--max-eval-examples", "4",
            "--max-epochs", "1", "--device", "cpu"]
    # the init-text baseline puts the whole init text (more than the soft prompt's 10 rows) before each source
    hard = len(token_ids(tok, get_task("cb").init_text))
    assert hard > 10
    code = main([*argv, "--max-length", str(64 - hard + 1)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and errors == [f"error: {hard} prompt tokens + --max-length {64 - hard + 1} exceed the model's "
                                    f"64 positions (max_position_embeddings); lower --max-length to at most "
                                    f"{64 - hard}"]
    assert not out.exists()
    assert main([*argv, "--max-length", str(64 - hard)]) == 0  # the limit itself fits
    assert main([*argv, "--max-length", "54", "--no-baselines", "--overwrite"]) == 0  # the soft prompt alone: 10


# ---------------------------------------------------------------------------------------------------------------
# 2. seeds: every CLI checks the range up front; derived seeds stay in range (tests/test_batching.py)

BIG = "184461906879890"  # passed the CLI, trained the baselines, then overflowed torch's manual_seed


def _one_line_exit_2(capsys, call, expected: str):
    with pytest.raises(SystemExit) as exc:
        call()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and expected in err, err


def test_train_cli_refuses_a_seed_out_of_range(tmp_path, capsys):
    from ptray.training.train import main

    _one_line_exit_2(capsys, lambda: main(["--task", "cb", "--seed", BIG, "--output-dir", str(tmp_path / "o")]),
                     f"argument --seed: must be a seed from 0 to {MAX_SEED} (2**32 - 1), got {BIG}")
    _one_line_exit_2(capsys, lambda: main(["--task", "cb", "--seed", "-1", "--output-dir", str(tmp_path / "o")]),
                     "argument --seed: must be a seed from 0 to")
    assert not (tmp_path / "o").exists()


def test_train_config_checks_the_seed_for_every_caller():
    from ptray.config import TrainConfig

    assert TrainConfig(seed=MAX_SEED).seed == MAX_SEED
    with pytest.raises(PtrayError, match=rf"seed must be an integer from 0 to {MAX_SEED} \(2\*\*32 - 1\), got {BIG}"):
        TrainConfig(seed=int(BIG))
    for bad in (-1, 2**32, 1.5, True):
        with pytest.raises(PtrayError):
            check_seed(bad)


def test_sweep_refuses_seeds_out_of_range_before_anything_starts(tmp_path, capsys, monkeypatch):
    from ptray.study.driver import main
    from ptray.study.flags import parse_seeds

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


def test_a_stored_plan_with_a_seed_out_of_range_is_refused_before_resuming(workdir, capsys):
    from ptray.plan import Plan
    from ptray.study import store, tracking

    mc = store.client(store.resolve_tracking_uri())
    exp = tracking.get_or_create_experiment(mc, "ptray-old")
    stored = {**Plan(study="old", tasks=("cb",), seeds=(0,)).to_json(), "seeds": [int(BIG)]}  # written before checks
    tracking.write_plan(mc, exp, "old", stored)
    code, _, err = _study(capsys, "--resume", "--study", "old", "--dry-run")
    assert code == 2 and err == f"error: every seed of a study must be an integer from 0 to {MAX_SEED} (2**32 - 1), " \
                                f"got {BIG}\n"


@pytest.mark.parametrize("module", ["ptray.lm.tiny_model", "analysis.__main__"])
def test_other_clis_with_a_seed_check_its_range(module, tmp_path, capsys):
    import importlib

    main = importlib.import_module(module).main
    argv = [str(tmp_path / "m")] if module == "ptray.lm.tiny_model" else ["--experiment", "x"]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--seed", str(2**64)])
    assert exc.value.code == 2 and "must be a seed from 0 to 4294967295" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------------------------
# 3. a relative user path means the same in every process of a study (Tune runs each trial in its own folder)


def test_every_study_path_reaches_the_workers_absolute(workdir, tiny_model_dir, data_dir, monkeypatch):
    import shutil

    from ptray.study import preflight, store
    from ptray.study.driver import study_context
    from ptray.study.flags import build_parser, options_from_args, plan_from_args

    shutil.copytree(tiny_model_dir, workdir / "tinymodel")
    (workdir / "data").symlink_to(data_dir)
    args = build_parser().parse_args(["--model", "./tinymodel", "--data-dir", "data", "--tasks", "cb", "--seeds",
                                      "0", "--tracking-uri", "sqlite:///runs/mlflow.db", "--storage-path", "ray",
                                      "--analysis-dir", "report"])
    plan, opts = plan_from_args(args), options_from_args(args)
    uri = store.resolve_tracking_uri(opts.tracking_uri)
    storage = preflight.resolve_storage(opts.storage_path, cluster=False)
    ctx = study_context(plan, "0", uri, None, None)
    monkeypatch.chdir(workdir.parent)  # a trial's working directory is its own folder
    cfg = ctx.train_config("cb", 0)
    assert cfg.model == str(workdir / "tinymodel") and cfg.data_dir == str(data_dir.resolve())
    assert uri == f"sqlite:///{workdir / 'runs' / 'mlflow.db'}" and storage == str(workdir / "ray")
    assert opts.analysis_dir == str(workdir / "report")
    assert plan.to_json()["train"]["model"] == str(workdir / "tinymodel")  # --resume compares the absolute path
    from ptray.lm.load import load_model

    load_model(cfg.model)  # loads from the other working directory
    for hub in ("bigscience/bloomz-560m", "gpt2"):  # Hub names are no paths: unchanged
        assert plan_from_args(build_parser().parse_args(["--model", hub])).train.model == hub


def test_the_printed_resume_command_names_the_same_store_and_storage_from_anywhere(workdir):
    from ptray.plan import Options, Plan
    from ptray.study.summary import resume_command

    opts = Options(tracking_uri="sqlite:///runs/mlflow.db", storage_path="ray results")
    assert resume_command(Plan(study="S"), opts) == (
        f"python sweeps/all.py --resume --study S --tracking-uri sqlite:///{workdir}/runs/mlflow.db "
        f"--storage-path '{workdir}/ray results'")
    assert resume_command(Plan(study="S"), Options(storage_path="s3://bucket/ray")).endswith("--storage-path s3://bucket/ray")


def test_the_node_cache_is_absolute(workdir, monkeypatch):
    # the smoke model's folder in it is logged as the study's model, and read later from other directories
    from ptray.study.bundle import cache_dir

    monkeypatch.setenv("PTRAY_CACHE", "cache")
    assert cache_dir() == workdir / "cache"
    monkeypatch.delenv("PTRAY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "xdg")
    assert cache_dir() == workdir / "xdg" / "ptray"


def test_study_refuses_a_model_path_that_does_not_exist_before_anything_starts(workdir, capsys):
    code, _, err = _study(capsys, "--model", "./tinymodel", "--tasks", "cb", "--seeds", "0")
    assert code == 2
    assert err == (f"error: --model './tinymodel' does not exist (looked for {workdir / 'tinymodel'}); pass an "
                   f"existing folder or a Hub name such as bigscience/bloomz-560m\n")
    assert list(workdir.iterdir()) == []  # no tracking store, no Tune folder


def test_study_refuses_a_max_length_that_cannot_serve_before_any_trial(workdir, capsys):
    from ptray.study import store, tracking

    code, _, err = _study(capsys, "--smoke", "--study", "short", "--tasks", "cb,copa", "--seeds", "0",
                          "--max-length", "3")
    assert code == 2
    assert err.startswith("error: --max-length 3 cannot hold cb's answer cue 'Answer:' and longest answer")
    assert err.count("\n") == 1
    assert not (workdir / "outputs").exists()  # no Tune folder: no trial started
    assert tracking.read_plan(store.client(store.resolve_tracking_uri()), "ptray-short", "short") is None


@pytest.mark.slow
def test_study_with_a_relative_model_path_trains_and_transfers(tmp_path, tiny_model_dir, data_dir):
    # issue 12's command: the trial failed with "model path './tinymodel' does not exist", the baseline loaded it
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    shutil.copytree(tiny_model_dir, tmp_path / "tinymodel")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    sweep = Path(__file__).resolve().parents[1] / "sweeps" / "all.py"
    done = subprocess.run([sys.executable, str(sweep), "--model", "./tinymodel", "--tasks", "cb", "--seeds", "0",
                           "--data-dir", str(data_dir), "--max-epochs", "1", "--max-train-examples", "8",
                           "--max-eval-examples", "8", "--max-length", "96", "--study", "relative",
                           "--no-analysis"], cwd=tmp_path, env={**env, "PTRAY_CACHE": str(tmp_path / "cache")},
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "training   1/1 trials done, 0 failed" in done.stdout
    assert "transfer   2/2 transfer and baseline runs done" in done.stdout


# ---------------------------------------------------------------------------------------------------------------
# 4. every check of a resumed study uses its stored plan


def test_resume_checks_the_data_folder_against_the_stored_tasks(workdir, capsys, data_dir):
    from ptray.config import TrainConfig
    from ptray.plan import Plan
    from ptray.study import store, tracking

    only_cb = workdir / "superglue"
    (only_cb / "CB").mkdir(parents=True)
    for split in ("train", "val"):
        (only_cb / "CB" / f"{split}.jsonl").symlink_to(data_dir / "CB" / f"{split}.jsonl")
    mc = store.client(store.resolve_tracking_uri())
    exp = tracking.get_or_create_experiment(mc, "ptray-S")
    plan = Plan(study="S", tasks=("cb",), seeds=(0,), train=TrainConfig(data_dir=str(only_cb), max_epochs=1))
    tracking.write_plan(mc, exp, "S", plan.to_json())
    code, out, err = _study(capsys, "--resume", "--study", "S", "--data-dir", str(only_cb), "--dry-run")
    assert code == 0, err
    assert "study 'S' (resume)" in out and "1 trials (cb x seeds 0)" in out
    (only_cb / "CB" / "val.jsonl").unlink()  # now the stored plan's own task lacks a file: that is the error
    code, _, err = _study(capsys, "--resume", "--study", "S", "--dry-run")
    assert code == 2
    assert err == (f"error: --data-dir {str(only_cb)!r} lacks CB/val.jsonl (the official SuperGLUE layout "
                   f"<TASK>/train.jsonl, <TASK>/val.jsonl)\n")
