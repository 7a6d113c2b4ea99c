"""sweeps/all.py: bad input fails in one line with exit code 2 and nothing started, --dry-run prints the plan, and the
smoke study stopped mid-way (Ctrl-C) and restarted with --resume completes without rerunning finished trials."""

from __future__ import annotations

import argparse
import dataclasses
import http.server
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest

from ptray.config import TrainConfig
from ptray.errors import PtrayError
from ptray.plan import Options, Plan
from ptray.study import cluster, store, tracking
from ptray.study.driver import analysis_phase, group_gpus, main, resolve_group_size
from ptray.study.flags import parse_seeds, parse_tasks
from ptray.study.tuner import trial_statuses

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "all.py"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def run_main(capsys, *argv):
    capsys.readouterr()  # only what main prints
    with pytest.raises(SystemExit) as exit_info:
        code = main(list(argv))
        raise SystemExit(code)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_seed_and_task_lists():
    assert parse_seeds("0-3") == (0, 1, 2, 3)
    assert parse_seeds("0,2,5-6") == (0, 2, 5, 6)
    assert parse_tasks("CB, rte") == ("cb", "rte")
    for bad, message in (("3-1", "the range '3-1' is empty"), ("-1", "not a seed"), ("0,0", "repeats seed"),
                         ("a", "not a seed")):
        with pytest.raises(ValueError, match=message):
            parse_seeds(bad)
    with pytest.raises(ValueError, match="valid tasks: cb, rte, copa, wsc. Did you mean 'copa'"):
        parse_tasks("cb,cpoa")
    with pytest.raises(ValueError, match="lists cb more than once"):
        parse_tasks("cb,cb")


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "cb,boolq"], "error: unknown task 'boolq'; valid tasks: cb, rte, copa, wsc. Other registered "
                              "tasks: wic."),
    (["--seeds", "0-x"], "error: --seeds '0-x': '0-x' is not a seed or a range like 0-3 (seeds are integers >= 0)"),
    (["--max-epochs", "0"], "error: argument --max-epochs: must be a positive integer, got 0 "
                            "(see python sweeps/all.py --help)"),
    (["--gpus-per-trial", "-1"], "error: argument --gpus-per-trial: must be a number >= 0, got -1 "
                                 "(see python sweeps/all.py --help)"),
    (["--address", "auto", "--storage-path", "rel/results"],
     "error: --storage-path 'rel/results' is relative; on a cluster give shared storage: s3://BUCKET/PATH or an "
     "absolute path on a filesystem mounted on every node (NFS, EFS)"),
    (["--data-dir", "no/such/dir"], "error: --data-dir 'no/such/dir' does not exist; pass the folder with "
                                    "<TASK>/{train,val}.jsonl (e.g. ../shared/data/superglue)"),
    (["--address", "127.0.0.1:1"], "error: --address 127.0.0.1:1: no Ray cluster answers at 127.0.0.1:1; is it "
                                   "running? (`ray status` on the head tells)"),
    (["--study", "a b"], "error: --study 'a b': use only ASCII letters (a-z, A-Z), digits, '-', '_' and '.', "
                         "starting with a letter or digit (it names the study's runs and its Tune folder)"),
    # é is a letter, but not an ASCII one: the rule says so (issue 32)
    (["--study", "étude"], "error: --study 'étude': use only ASCII letters (a-z, A-Z), digits, '-', '_' and '.', "
                           "starting with a letter or digit (it names the study's runs and its Tune folder)"),
    (["--study", "x" * 65], "error: --study '" + "x" * 65 + "': at most 64 characters (it has 65) (it names the "
                            "study's runs and its Tune folder)"),
    # the experiment names the analysis's report folder: no nesting, no way out of outputs/analysis
    *[(["--experiment", bad], f"error: --experiment {bad!r}: use only ASCII letters (a-z, A-Z), digits, '-', '_' "
                              f"and '.', starting with a letter or digit (the analysis writes its report into a "
                              f"folder of that name under outputs/analysis; or pass --analysis-dir DIR)")
      for bad in ("a/b", "../../x", "/tmp/x", ".hidden")],
])
def test_bad_input_is_one_line_and_exit_2(workdir, capsys, argv, message):
    code, _, err = run_main(capsys, *argv, "--smoke")
    assert code == 2
    assert err.strip() == message
    assert not (workdir / "mlflow.db").exists() and not (workdir / "outputs").exists()  # nothing half-done


def test_an_experiment_that_names_no_folder_is_fine_with_analysis_dir_or_without_analysis(workdir, capsys):
    for extra in (["--analysis-dir", "report"], ["--no-analysis"]):
        code, out, err = run_main(capsys, "--dry-run", "--smoke", "--experiment", "team/a b", *extra)
        assert code == 0 and err == "" and "experiment 'team/a b'" in out


def test_resume_of_a_missing_study_fails(workdir, capsys):
    code, _, err = run_main(capsys, "--resume", "--study", "nope")
    assert code == 2
    assert err.strip() == (f"error: there is no study 'nope' to resume: the tracking store "
                           f"sqlite:///{workdir / 'mlflow.db'} does not exist; check --tracking-uri (or "
                           f"MLFLOW_TRACKING_URI) and the working directory")
    assert not (workdir / "mlflow.db").exists()
    tracking.get_or_create_experiment(store.client(store.resolve_tracking_uri()), "ptray-other")
    code, _, err = run_main(capsys, "--resume", "--study", "nope")
    assert code == 2
    assert err.strip() == (f"error: there is no study 'nope' to resume in MLflow experiment 'ptray-nope' at "
                           f"sqlite:///{workdir / 'mlflow.db'}; check --study, --experiment and --tracking-uri, or "
                           f"start it without --resume")


def test_dry_run_prints_the_plan(workdir, capsys, data_dir):
    code, out, err = run_main(capsys, "--dry-run", "--smoke", "--data-dir", str(data_dir))
    assert code == 0 and err == ""
    assert "16 trials (cb, rte, copa, wsc x seeds 0, 1, 2, 3), each 1 CPU + 0.25 GPU if the cluster has GPUs" in out
    assert "cb-seed0 cb-seed1 cb-seed2 cb-seed3 rte-seed0" in out and "wsc-seed3" in out
    assert "68 evaluations (16 prompts x 4 tasks + 4 no-prompt baselines)" in out
    sid = re.search(r"study '(smoke-\d{8}-\d{6})' \(new, smoke\)", out).group(1)  # each smoke run is a study
    assert f"experiment 'ptray-{sid}' at sqlite:///{workdir / 'mlflow.db'}" in out
    assert f"Tune       {workdir / 'outputs' / 'ray_results' / sid}" in out
    assert "up to 2 epochs" in out and "first 32 train / 32 eval examples" in out
    assert not (workdir / "mlflow.db").exists()  # a dry run touches nothing
    code, out, _ = run_main(capsys, "--dry-run", "--tasks", "rte", "--seeds", "4", "--gpus-per-trial", "0.5",
                            "--no-analysis")
    assert "1 trials (rte x seeds 4), each 1 CPU + 0.5 GPU" in out and "bigscience/bloomz-560m" in out
    assert "2 evaluations (1 prompts x 1 tasks + 1 no-prompt baselines)" in out and "analysis   off" in out
    assert "groups     auto: one prompt per trial on CPUs; with GPUs 4 prompts per trial (one GPU each), 1 trials: " \
           "[rte-seed4]" in out
    code, out, _ = run_main(capsys, "--dry-run", "--tasks", "cb,rte", "--seeds", "0-2", "--group-size", "2")
    assert code == 0 and "groups     2 prompts per trial, trained together on one model, 3 trials: " \
                         "[cb-seed0 cb-seed1] [cb-seed2 rte-seed0] [rte-seed1 rte-seed2]" in out


def test_plan_prints_answer_ids_and_init_token_counts(workdir, capsys, data_dir, tiny_model_dir):
    """The plan shows, per task, the model's tokenizer's answer ids after the cue and the init text's length."""
    from transformers import AutoTokenizer

    from ptray.data.tasks import TASKS
    from ptray.data.tokens import answer_ids_in_context, token_ids

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    code, out, _ = run_main(capsys, "--dry-run", "--tasks", "cb,copa", "--targets", "rte", "--seeds", "0",
                            "--model", str(tiny_model_dir), "--data-dir", str(data_dir))
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith(("  tokens", "             "))][-3:]
    for line, name in zip(lines, ("cb", "copa", "rte")):
        task = TASKS[name]
        ids = answer_ids_in_context(tok, task.answer_cue, task.answers)
        assert f" {name}: answers " + ", ".join(f"{a.strip()!r} {i}" for a, i in zip(task.answers, ids)) in line
        assert line.endswith(f"init text {len(token_ids(tok, task.init_text))} tokens" if name != "rte" else
                             "(transfer only)")
    assert lines[0].startswith("  tokens     cb: answers 'yes' [")
    code, out, _ = run_main(capsys, "--dry-run", "--tasks", "cb", "--seeds", "0", "--model", "no/such-model",
                            "--data-dir", str(data_dir))
    assert "  tokens     the tokenizer is not on this machine: each trial checks its answers and lengths" in out


def test_resume_refuses_a_changed_plan(workdir, capsys, data_dir):
    mc = store.client(store.resolve_tracking_uri())
    exp = tracking.get_or_create_experiment(mc, "ptray-smoke")
    plan = Plan(study="smoke", tasks=("cb", "rte"), seeds=(0, 1), smoke=True, tiny_model=True, group_size=2,
                train=TrainConfig(data_dir=str(data_dir)))
    tracking.write_plan(mc, exp, "smoke", plan.to_json())
    code, _, err = run_main(capsys, "--resume", "--smoke", "--study", "smoke", "--tasks", "cb")
    assert code == 2
    assert err.strip() == ("error: --resume continues study 'smoke' as it was started, but --tasks (the study has "
                           "cb,rte, the command line says cb); leave those flags out, or start a new --study")
    # Every training setting is compared, not a hand-kept list of them.
    code, _, err = run_main(capsys, "--resume", "--study", "smoke", "--eval-batch-size", "4", "--lr", "0.03")
    assert code == 2 and err.strip() == ("error: --resume continues study 'smoke' as it was started, but "
                                         "--eval-batch-size (the study has 32, the command line says 4); leave those "
                                         "flags out, or start a new --study")
    code, _, err = run_main(capsys, "--smoke", "--study", "smoke", "--data-dir", str(data_dir))  # same name
    assert code == 2 and "study 'smoke' already exists in MLflow experiment 'ptray-smoke'" in err
    assert "pass --resume to finish it, or choose another --study" in err
    code, out, _ = run_main(capsys, "--resume", "--study", "smoke", "--dry-run")
    assert code == 0 and "study 'smoke' (resume, smoke)" in out and "4 trials (cb, rte x seeds 0, 1)" in out
    assert "2 prompts per trial, trained together on one model, 2 trials: [cb-seed0 cb-seed1]" in out  # as stored
    code, _, err = run_main(capsys, "--resume", "--study", "smoke", "--group-size", "4")
    assert code == 2 and "--group-size (the study has 2, the command line says 4)" in err
    code, _, err = run_main(capsys, "--resume", "--smoke")
    assert code == 2 and err.startswith("error: --resume --smoke needs --study: each smoke run is its own study")


def test_group_size_and_gpus_per_group_trial():
    # Unset: one prompt per trial on CPUs; 4 per trial with GPUs, a group then asking for one whole GPU.
    assert resolve_group_size(None, 0.0) == 1 and resolve_group_size(None, 0.25) == 4
    assert resolve_group_size(3, 0.0) == 3 and resolve_group_size(1, 0.25) == 1
    assert group_gpus(0.25, 4, Options()) == 1.0 and group_gpus(0.25, 1, Options()) == 0.25
    assert group_gpus(0.25, 8, Options()) == 1.0 and group_gpus(0.0, 4, Options()) == 0.0
    assert group_gpus(0.5, 4, Options(gpus_per_trial=0.5)) == 0.5  # --gpus-per-trial is per Tune trial, as given


def test_plan_round_trips_and_reads_flat_plans():
    import dataclasses
    import json

    plan = Plan(study="s", tasks=("cb", "wsc"), seeds=(1, 5), smoke=True, tiny_model=True, model_digest="abc",
                train=TrainConfig(lr=0.1, max_length=64, init="random", max_eval_examples=8))
    stored = json.loads(json.dumps(plan.to_json()))
    assert "task" not in stored["train"] and "seed" not in stored["train"] and "compile" not in stored["train"]
    assert Plan.from_json(stored) == plan
    compared = plan.compared()
    assert set(compared) == ({f.name for f in dataclasses.fields(TrainConfig)} - {"task", "seed", "compile"}
                             | {"tasks", "seeds", "smoke", "tiny_model", "group_size", "targets", "conditions",
                                "search", "num_samples"})
    grouped = dataclasses.replace(plan, group_size=2)
    assert Plan.from_json(json.loads(json.dumps(grouped.to_json()))).group_size == 2
    assert grouped.groups() == [(("cb", 1), ("cb", 5)), (("wsc", 1), ("wsc", 5))]  # one task's seeds together
    assert grouped.groups(3) == [(("cb", 1), ("cb", 5), ("wsc", 1)), (("wsc", 5),)]
    with pytest.raises(PtrayError, match="group_size must be a positive integer"):
        Plan(group_size=0)
    # Studies stored before the plan held a TrainConfig resume as they were.
    flat = {"study": "old", "tasks": ["cb"], "seeds": [0], "model": "tiny", "data_dir": None, "max_epochs": 2,
            "patience": 5, "lr": 0.03, "batch_size": 8, "max_train_examples": 32, "max_eval_examples": 32,
            "max_length": 128, "smoke": True, "model_digest": "d", "data_digest": None}
    old = Plan.from_json(flat)
    assert old.tiny_model and old.train.max_epochs == 2 and old.train.max_length == 128 and old.model_digest == "d"
    assert old.group_size == 1  # stored before trial groups: one prompt per trial, as it ran


def test_every_plan_flag_reaches_the_plan():
    """Each flag built from a Plan field, set to something other than its default, lands in that field: the plan is
    read from the flags by field, not by a hand-kept list of names a new field could miss."""
    from ptray.cli import add_config_arguments
    from ptray.study.flags import build_parser, plan_from_args

    samples = {"tasks": ("cb,rte", ("cb", "rte")), "seeds": ("5,7", (5, 7)),  # parsed by the driver, not argparse
               "targets": ("wic", ("wic",))}
    parser = build_parser()
    names = add_config_arguments(argparse.ArgumentParser(), Plan)
    assert {"tasks", "seeds", "smoke", "group_size"} <= set(names)
    default = Plan()
    for name in names:
        (action,) = [a for a in parser._actions if a.dest == name]
        if name in samples:
            argv, want = [action.option_strings[0], samples[name][0]], samples[name][1]
        elif action.nargs == 0:  # a switch: --smoke, or --no-x for a field that defaults to True
            argv, want = [action.option_strings[0]], not getattr(default, name)
        else:  # a new field of another kind: give it a sample above
            value = str(action.choices[-1]) if action.choices else "3"
            argv, want = [action.option_strings[0], value], (action.type or str)(value)
        plan = plan_from_args(parser.parse_args(argv))
        assert getattr(plan, name) == want != getattr(default, name), argv


def test_a_new_plan_field_gets_a_flag_that_reaches_the_plan(monkeypatch):
    from ptray.cli import config_field, positive_int
    from ptray.study import flags

    @dataclasses.dataclass
    class Later(Plan):
        max_hours: int | None = config_field(None, "a plan setting added later", type=positive_int)

    monkeypatch.setattr(flags, "Plan", Later)
    args = flags.build_parser().parse_args(["--max-hours", "5", "--seeds", "2"])
    plan = flags.plan_from_args(args)
    assert isinstance(plan, Later) and plan.max_hours == 5 and plan.seeds == (2,)
    assert flags.plan_from_args(flags.build_parser().parse_args([])).max_hours is None


def test_the_analysis_is_passed_in_by_the_entry_script():
    calls = []

    def analyse(experiment, tracking_uri=None, out_dir=None):
        calls.append((experiment, tracking_uri, out_dir))
        return "outputs/analysis/x"

    note = analysis_phase("ptray-x", "sqlite:///m.db", Options(analysis_dir="out"), True, analyse)
    assert calls == [("ptray-x", "sqlite:///m.db", "out")]
    report = Path("outputs/analysis/x").resolve()
    assert note == f"done: the 'analysis' run of experiment 'ptray-x' (report in {report})"
    assert analysis_phase("ptray-x", "u", Options(analysis=False), True, analyse) == "off (--no-analysis)"
    assert analysis_phase("ptray-x", "u", Options(), False, analyse) == "skipped: the study is incomplete"
    assert analysis_phase("ptray-x", "u", Options(), True, None) == \
        "not run here: python -m analysis --experiment ptray-x"

    def broken(experiment, tracking_uri=None, out_dir=None):
        raise RuntimeError("no model\nmore")

    assert analysis_phase("ptray-x", "u", Options(), True, broken) == "failed: RuntimeError: no model"
    assert calls == [("ptray-x", "sqlite:///m.db", "out")]
    # The entry script passes analysis.run; the library itself never imports the analysis.
    assert "analysis.run" in SWEEP.read_text()
    code = ("import sys, ptray.study.driver, ptray.study.trial, ptray.study.tuner, ptray.study.transfer; "
            "print(any(m.split('.')[0] == 'analysis' for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
    ptray_sources = "\n".join(p.read_text() for p in (ROOT / "ptray").rglob("*.py"))
    assert not re.search(r"^\s*(import analysis|from analysis)", ptray_sources, re.M)


# ---------------------------------------------------------------------------------------------------------------
# the smoke study, stopped and resumed


def count_finished_train_runs(db: Path) -> int:
    """Read-only SQL on the driver's store: an MlflowClient here could race the driver's schema migration."""
    if not db.exists():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            return con.execute(
                "SELECT count(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                "WHERE r.status = 'FINISHED' AND t.key = 'ptray.kind' AND t.value = 'train'").fetchone()[0]
    except sqlite3.OperationalError:  # the schema is still being created
        return 0


def finished_train_runs(mc, sid):
    exp = mc.get_experiment_by_name(f"ptray-{sid}")
    return {r.info.run_name: r for r in tracking.search_study_runs(mc, exp.experiment_id, sid, kind="train")
            if r.info.status == "FINISHED"}


@pytest.mark.slow
def test_smoke_study_stopped_and_resumed_reruns_nothing_finished(tmp_path, data_dir):
    """The 'done when' study (16 train runs, 68 transfer/baseline runs with their artifacts), interrupted by Ctrl-C
    after a few trials and finished with the --resume command it printed. Its prompts train in trial groups of two
    (8 Tune trials), a grouping the stored plan keeps on --resume."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, str(SWEEP), "--smoke", "--data-dir", str(data_dir),
                                  "--group-size", "2", "--no-analysis"],
                                 cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while count_finished_train_runs(tmp_path / "mlflow.db") < 3:
                assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no trial finished in 5 minutes"
                time.sleep(0.5)
            first.send_signal(signal.SIGINT)  # Ctrl-C
            assert first.wait(timeout=120) == 130
        finally:
            if first.poll() is None:
                first.kill()
    first_log = (tmp_path / "first.log").read_text()
    # the default output: a line per trial start and prompt epoch, no Ray table, no forced-snapshot warning
    assert "cb-seed0+cb-seed1: started" in first_log and "cb-seed0 epoch 1/2: train_loss " in first_log
    assert "Trial status" not in first_log and "snapshotting has been triggered" not in first_log
    resume_cmd = re.search(r"Finish the study with:\n  (python sweeps/all.py --resume --study (smoke-\d{8}-\d{6}))\n",
                           first_log)
    assert resume_cmd, first_log[-3000:]
    sid = resume_cmd.group(2)
    mc = store.client(uri)
    before = finished_train_runs(mc, sid)
    assert 3 <= len(before) < 16
    history = {n: [(m.step, m.value) for m in mc.get_metric_history(r.info.run_id, "eval_loss")]
               for n, r in before.items()}
    statuses = trial_statuses(str(tmp_path / "outputs" / "ray_results" / sid))
    tune_done = [name for name, status in statuses.items() if status == "TERMINATED"]
    assert len(statuses) == 8 and 0 < 2 * len(tune_done) <= len(before)  # a finished group: two finished runs
    assert all("+" in name for name in statuses)  # cb-seed0+cb-seed1: its prompts' run names

    # The printed command, as a user would paste it (plus --no-analysis to keep the test short).
    resume = [sys.executable, str(SWEEP), *resume_cmd.group(1).split()[2:], "--no-analysis"]
    second = subprocess.run(resume, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "16/16 trials done, 0 failed" in second.stdout and "68/68 transfer and baseline runs done" in second.stdout
    # Trials finished when the driver stopped were not started again by Tune. (A trial that finished in MLflow
    # just before Tune recorded it is restarted, finds its FINISHED run and reports it: it trains nothing.)
    for name in tune_done:
        assert f"{name}: started" not in second.stdout
    # No finished run was trained or logged again.
    for name, run in before.items():
        again = mc.get_run(run.info.run_id)
        assert again.info.end_time == run.info.end_time and again.info.status == "FINISHED"
        assert [(m.step, m.value) for m in mc.get_metric_history(run.info.run_id, "eval_loss")] == history[name]

    exp = mc.get_experiment_by_name(f"ptray-{sid}").experiment_id
    runs = tracking.search_study_runs(mc, exp, sid)
    assert Counter(r.data.tags["ptray.kind"] for r in runs) == {"train": 16, "transfer": 64, "baseline": 4}
    assert len({r.info.run_name for r in runs}) == len(runs) == 84  # one run per trial and evaluation
    assert all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        artifacts = {a.path for a in mc.list_artifacts(run.info.run_id)}
        if run.data.tags["ptray.kind"] == "train":
            assert artifacts == {"config.json", "history.json", "metrics.json", "predictions.json", "prompt"}
            assert tracking.logged_epochs(mc, run.info.run_id) == [1, 2]
        else:
            assert artifacts == {"metrics.json", "predictions.json"}
    # The resumed run continued the stored plan.
    stored = tracking.read_plan(mc, f"ptray-{sid}", sid)
    assert stored["tasks"] == ["cb", "rte", "copa", "wsc"] and stored["seeds"] == [0, 1, 2, 3]
    assert stored["train"]["max_epochs"] == 2 and stored["tiny_model"] and stored["model_digest"]
    assert stored["group_size"] == 2
    assert Plan.from_json(stored).train.max_length == 128

    # Once more, as printed (with the analysis this time): nothing is left to train or evaluate.
    third = subprocess.run(resume[:-1], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                           check=False)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "cb-seed0+cb-seed1: started" not in third.stdout
    assert "transfer on cb: 0 new runs" in third.stdout
    after = Counter(r.data.tags["ptray.kind"] for r in tracking.search_study_runs(mc, exp, sid))
    assert after == {"train": 16, "transfer": 64, "baseline": 4, "analysis": 1}

    # The analysis of this real smoke-study store: its run holds the report and every figure beside its numbers,
    # and Table 1 equals the norms recomputed from the downloaded prompt artifacts.
    import mlflow
    import numpy as np
    import pandas as pd
    from safetensors.torch import load_file

    analysis_runs = [r for r in mc.search_runs([exp]) if r.data.tags.get("ptray.kind") == "analysis"]
    assert len(analysis_runs) == 1 and analysis_runs[0].info.status == "FINISHED", third.stdout[-3000:]
    logged = {a.path for a in mc.list_artifacts(analysis_runs[0].info.run_id)}
    assert {"report.html", "report.md", "table1_norms.csv", "transfer.png", "distances.png"} <= logged
    for png in (p for p in logged if p.endswith(".png")):
        stem = png[:-4]
        assert f"{stem}.csv" in logged or f"{stem}.json" in logged, png
    table = pd.read_csv(mlflow.artifacts.download_artifacts(
        run_id=analysis_runs[0].info.run_id, artifact_path="table1_norms.csv", tracking_uri=uri)).set_index("task")
    norms = {}
    for run in runs:
        if run.data.tags["ptray.kind"] == "train":
            path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, tracking_uri=uri,
                                                       artifact_path="prompt/adapter_model.safetensors")
            rows = load_file(path)["prompt_embeddings"].double()
            norms.setdefault(run.data.tags["ptray.task"], []).append(float(rows.norm()))
    for task, values in norms.items():
        assert table.loc[task, "frobenius_raw_mean"] == pytest.approx(np.mean(values))
        assert table.loc[task, "frobenius_raw_var_ddof0"] == pytest.approx(np.var(values), abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# a cluster of several machines: what the trials on other nodes could not reach is refused before anything starts


class _HealthyMlflow(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # /health and the experiments search both answer 200, like an MLflow server
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


@pytest.fixture
def several_machines(monkeypatch):
    """The driver on 127.0.0.2, another node on 10.0.0.2 (no autoscaler config on this machine)."""
    import ray

    monkeypatch.setattr(cluster, "_cluster_ips", lambda: {"127.0.0.2", "10.0.0.2"})
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.2")
    monkeypatch.setattr(cluster, "_autoscaling", lambda: False)
    return Options(address="auto")


def test_cluster_refuses_a_local_tracking_store(several_machines, tmp_path):
    with pytest.raises(ValueError, match=r"the tracking store sqlite:///\S+ is a file on this machine, but the Ray "
                                         r"cluster has other machines; run an MLflow server"):
        cluster.check_cluster(several_machines, f"sqlite:///{tmp_path / 'mlflow.db'}", "s3://b/p")


def test_cluster_refuses_local_disk_storage(several_machines, tmp_path):
    with pytest.raises(ValueError, match=r"--storage-path \S+ is on this machine's local disk \(\w+\), but the Ray "
                                         r"cluster has other machines"):
        cluster.check_cluster(several_machines, "http://10.0.0.1:5000", str(tmp_path / "results"))
    assert cluster.check_cluster(several_machines, "http://10.0.0.1:5000", "s3://bucket/ray") == "http://10.0.0.1:5000"


def test_cluster_rewrites_a_loopback_tracking_uri(several_machines):
    server = http.server.HTTPServer(("0.0.0.0", 0), _HealthyMlflow)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # Workers cannot reach "localhost" on the head: they get the head's address instead.
        assert cluster.check_cluster(several_machines, f"http://localhost:{port}", "s3://b/p") == \
            f"http://127.0.0.2:{port}"
    finally:
        server.shutdown()
    with pytest.raises(ValueError, match=rf"--tracking-uri http://127.0.0.1:{port} is this machine's loopback, which "
                                         r"other nodes cannot reach, and the server does not answer at "
                                         rf"http://127.0.0.2:{port}; start it with --host 0.0.0.0"):
        cluster.check_cluster(several_machines, f"http://127.0.0.1:{port}", "s3://b/p")
