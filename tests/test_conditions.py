"""Studies beyond the paper: conditions in the plan (run names, tags, params, groups by the frozen model), declared
studies run by name or file (``--study``, ``sweeps/NAME.py``), their ``--dry-run`` grid, ``--resume`` against the
declaration, and a Tune search (ASHA per task; stopped trials' runs KILLED with ``ptray.stopped_by``)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from ptray import layout
from ptray.config import GROUP_SHARED_FIELDS, TrainConfig
from ptray.plan import Plan
from ptray.study import tracking
from ptray.study.context import StudyContext
from ptray.study.driver import main
from ptray.study.flags import build_parser, plan_from_args
from ptray.study.store import client, resolve_tracking_uri
from ptray.study.study_file import shipped_studies

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("paper", "init", "length", "optimizer", "lr")  # one sweeps/NAME.py per shipped declaration


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def run_main(capsys, *argv):
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def plan_of(*argv) -> Plan:
    return plan_from_args(build_parser().parse_args(list(argv)))


# ---------------------------------------------------------------------------------------------------------------
# the plan


def test_a_plan_with_conditions():
    plan = Plan(tasks=("cb", "rte"), seeds=(0, 1), conditions={"text": {"init": "text"}, "random": {"init": "random"}},
                train=TrainConfig(max_epochs=3))
    assert plan.trials[:4] == [("cb", 0, "text"), ("cb", 1, "text"), ("cb", 0, "random"), ("cb", 1, "random")]
    assert len(plan.trials) == 8 and plan.num_evaluations == 8 * 2 + 2
    assert [layout.train_run_name(*m) for m in plan.trials[:3]] == ["cb-seed0-text", "cb-seed1-text",
                                                                     "cb-seed0-random"]
    cfg = plan.trial_config(("rte", 1, "random"))
    assert (cfg.task, cfg.seed, cfg.init.value, cfg.max_epochs) == ("rte", 1, "random", 3)
    # groups pack across conditions: one task's prompts together
    assert plan.groups(4) == [(("cb", 0, "text"), ("cb", 1, "text"), ("cb", 0, "random"), ("cb", 1, "random")),
                              (("rte", 0, "text"), ("rte", 1, "text"), ("rte", 0, "random"), ("rte", 1, "random"))]
    stored = json.loads(json.dumps(plan.to_json()))
    assert Plan.from_json(stored) == plan and plan.compared()["conditions"] == plan.conditions
    # without conditions: today's members, names and groups
    assert Plan(tasks=("cb",), seeds=(0, 1)).trials == [("cb", 0), ("cb", 1)]


def test_groups_keep_apart_conditions_that_change_the_frozen_model():
    plan = Plan(tasks=("cb",), seeds=(0, 1), conditions={"one": {}, "split": {"max_tokens_per_forward": 64},
                                                         "two": {"init": "random"}})
    groups = plan.groups(8)
    assert groups == [(("cb", 0, "one"), ("cb", 1, "one"), ("cb", 0, "two"), ("cb", 1, "two")),
                      (("cb", 0, "split"), ("cb", 1, "split"))]
    for group in groups:
        values = {tuple(getattr(plan.trial_config(m), f) for f in GROUP_SHARED_FIELDS) for m in group}
        assert len(values) == 1


def test_a_search_plan_is_one_prompt_per_trial():
    plan = plan_of("--study", "lr", "--tasks", "cb,rte", "--num-samples", "3", "--smoke")
    assert plan.trials == [("cb", 0, "sample0"), ("cb", 0, "sample1"), ("cb", 0, "sample2"), ("rte", 0, "sample0"),
                           ("rte", 0, "sample1"), ("rte", 0, "sample2")]
    assert all(len(g) == 1 for g in plan.groups(4))
    assert plan.search["scheduler"] == "asha" and plan.search["space"]["lr"]["distribution"] == "loguniform"
    from ptray.study.tuner import param_space, trial_conditions

    assert trial_conditions(plan) == {"sample0": {}, "sample1": {}, "sample2": {}}
    space = param_space(plan)
    assert set(space) == {"task", "seed", "condition", "lr"}
    assert (space["lr"].lower, space["lr"].upper) == (1e-3, 1.0)
    from ptray.study.tuner import scheduler

    plan.group_size = 1
    asha = scheduler(plan)  # one ASHA per task: losses of different tasks are not compared
    assert asha.metric == "eval_loss"
    assert asha.point({"task": "rte", "seed": 0, "condition": "sample2"}) == ("rte", None)
    assert scheduler(plan_of("--study", "init")) is None


# ---------------------------------------------------------------------------------------------------------------
# declared studies on the command line


def test_each_shipped_declaration_has_its_script():
    assert set(SCRIPTS) <= set(shipped_studies())
    for name in SCRIPTS:
        text = (ROOT / "sweeps" / f"{name}.py").read_text()
        assert f'main_declared("{name}", analyse=analysis.run)' in text, name


@pytest.mark.parametrize("name, size, names", [
    ("paper", "", "cb-seed0 rte-seed0"),
    ("init", "4 conditions x 2 tasks x 1 seeds = 8 prompts", "cb-seed0-text cb-seed0-random cb-seed0-sample_vocab"),
    ("length", "6 conditions x 2 tasks x 1 seeds = 12 prompts", "cb-seed0-n1 cb-seed0-n5"),
    ("optimizer", "4 conditions x 2 tasks x 1 seeds = 8 prompts", "cb-seed0-adam cb-seed0-adamw"),
    ("lr", "2 tasks x 1 seeds x 16 samples = 32 prompts", "cb-seed0-sample0 cb-seed0-sample1"),
])
def test_dry_run_of_each_declared_study(workdir, capsys, data_dir, name, size, names):
    code, out, err = run_main(capsys, "--study", name, "--smoke", "--dry-run", "--tasks", "cb,rte", "--seeds", "0",
                              "--data-dir", str(data_dir))
    assert code == 0 and err == "", err
    assert re.search(rf"study '{name}-smoke-\d{{8}}-\d{{6}}' \(new, smoke\)", out)
    assert f"declared   {ROOT / 'sweeps' / 'studies' / f'{name}.toml'} (study '{name}')" in out
    assert names in out and (f"grid       {size}" in out if size else "grid" in out)
    assert not (workdir / "mlflow.db").exists()


def test_a_plain_study_is_todays(workdir, capsys, data_dir):
    code, out, _ = run_main(capsys, "--study", "mine", "--smoke", "--dry-run", "--tasks", "cb", "--seeds", "0",
                            "--data-dir", str(data_dir))
    assert code == 0 and "study 'mine' (new, smoke)" in out and "declared" not in out and "condition" not in out
    assert "             cb-seed0\n" in out
    plain, declared = plan_of(), plan_of("--study", "paper")
    assert plain.study == declared.study == "paper" and plain.declaration is None
    assert dataclasses.replace(declared, declaration=None) == plain  # the paper declared is today's default


def test_flags_win_over_the_declaration_and_conflicts_are_refused(workdir, capsys, data_dir, tmp_path):
    plan = plan_of("--study", "init", "--max-epochs", "7", "--tasks", "wsc", "--seeds", "3")
    assert plan.train.max_epochs == 7 and plan.tasks == ("wsc",) and plan.seeds == (3,)
    assert plan.study == "init" and list(plan.conditions) == ["text", "random", "sample_vocab", "class_labels"]
    for argv, message in [
        (["--study", "optimizer", "--optimizer", "sgd"],
         "error: --optimizer: the study sets optimizer in its conditions (adam, adamw, adafactor, sgd); leave the flag "
         "out"),
        (["--study", "lr", "--lr", "0.1"], "error: --lr: the study sets lr in its search; leave the flag out"),
        (["--study", "lr", "--group-size", "2"], "error: --group-size 2: a searched trial is a group of one (its "
                                                 "scheduler stops trials, and a group holds several prompts)"),
        (["--num-samples", "3"], "error: --num-samples: the study declares no search; it trains each (task, seed) "
                                 "once"),
        (["--study", "inti.toml"], "error: study file 'inti.toml' not found"),
    ]:
        code, _, err = run_main(capsys, *argv, "--dry-run", "--data-dir", str(data_dir))
        assert code == 2 and err.strip().startswith(message), err
    mine = tmp_path / "mine.toml"
    mine.write_text('name = "mine"\ndescription = "d"\ntasks = ["cb"]\nseeds = [5]\n[train]\nmax_epochs = 4\n'
                    '[conditions.short]\nnum_tokens = 2\n[conditions.long]\nnum_tokens = 9\n')
    plan = plan_of("--study", str(mine))
    assert plan.study == "mine" and plan.train.max_epochs == 4 and plan.trials == [("cb", 5, "short"),
                                                                                   ("cb", 5, "long")]
    assert plan.declaration["source"] == str(mine) and len(plan.declaration["digest"]) == 64


def test_resume_compares_the_declaration(workdir, capsys, data_dir, tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text('name = "mine"\ndescription = "d"\ntasks = ["cb"]\nseeds = [0]\n[conditions.a]\nnum_tokens = 2\n')
    plan = plan_of("--study", str(mine), "--data-dir", str(data_dir))
    mc = client(resolve_tracking_uri())
    exp = tracking.get_or_create_experiment(mc, "ptray-mine")
    tracking.write_plan(mc, exp, "mine", plan.to_json())
    code, out, err = run_main(capsys, "--resume", "--study", str(mine), "--dry-run")
    assert code == 0 and "study 'mine' (resume)" in out and "cb-seed0-a" in out, err
    code, out, _ = run_main(capsys, "--resume", "--study", "mine", "--dry-run")  # by its id: the stored plan
    assert code == 0 and "condition  a: num_tokens=2" in out
    mine.write_text(mine.read_text().replace("num_tokens = 2", "num_tokens = 3"))
    code, _, err = run_main(capsys, "--resume", "--study", str(mine), "--dry-run")
    assert code == 2 and f"the declaration {mine} changed since the study started" in err
    # a plain study that happens to have a shipped declaration's name resumes with it when they agree
    paper = Plan(study="paper", tasks=("cb",), seeds=(0,), train=TrainConfig(data_dir=str(data_dir)))
    exp = tracking.get_or_create_experiment(mc, "ptray-paper")
    tracking.write_plan(mc, exp, "paper", paper.to_json())
    code, out, err = run_main(capsys, "--resume", "--study", "paper", "--dry-run", "--tasks", "cb", "--seeds", "0")
    assert code == 0, err
    stored = dataclasses.replace(paper, conditions={"x": {"init": "random"}})
    exp = tracking.get_or_create_experiment(mc, "ptray-init")
    tracking.write_plan(mc, exp, "init", dataclasses.replace(stored, study="init").to_json())
    code, _, err = run_main(capsys, "--resume", "--study", "init", "--dry-run", "--tasks", "cb", "--seeds", "0")
    assert code == 2 and "the declaration's conditions (the study has {'x': {'init': 'random'}}" in err


# ---------------------------------------------------------------------------------------------------------------
# trials, transfer and the search's stopped runs in MLflow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlruns') / 'mlflow.db'}"
    return uri, tracking.get_or_create_experiment(client(uri), "ptray-test-conditions")


def test_a_conditioned_prompt_is_tagged_named_and_trained_with_its_overrides(store, tiny_model_dir, data_dir):
    from ptray.study.trial import group_key, parse_group_key, run_group

    uri, exp = store
    ctx = StudyContext(study="cond", experiment_id=exp, tracking_uri=uri, model_label=str(tiny_model_dir),
                       data_label=str(data_dir), params={"study": "cond"},
                       train=TrainConfig(model=str(tiny_model_dir), data_dir=str(data_dir), max_epochs=1,
                                         max_train_examples=8, max_eval_examples=8, max_length=64, baselines=False))
    assert parse_group_key(group_key([("cb", 0, "random"), ("cb", 1)])) == [("cb", 0, "random"), ("cb", 1)]
    reports = []
    finals = run_group({"group": "cb:0:random,cb:0:short"}, ctx, None, lambda m, s: reports.append(m),
                       {"random": {"init": "random"}, "short": {"num_tokens": 2}})
    assert set(finals) == {"cb-seed0-random", "cb-seed0-short"}
    mc = client(uri)
    runs = {r.info.run_name: r for r in tracking.search_study_runs(mc, exp, "cond", kind=layout.TRAIN)}
    assert runs["cb-seed0-random"].data.tags[layout.TAG_CONDITION] == "random"
    assert runs["cb-seed0-random"].data.params["init"] == "random"
    assert runs["cb-seed0-short"].data.params["num_tokens"] == "2" and runs["cb-seed0-short"].data.params["init"] \
        == "text"
    assert all(r.info.status == layout.FINISHED for r in runs.values())


def test_a_searched_trial_stopped_by_tune_keeps_its_run_for_the_study_to_mark(store, tiny_model_dir, data_dir):
    from ptray.study.trial import run_group
    from ptray.study.tuner import finish_stopped

    uri, exp = store
    ctx = StudyContext(study="stop", experiment_id=exp, tracking_uri=uri, model_label=str(tiny_model_dir),
                       data_label=str(data_dir), params={"study": "stop"},
                       train=TrainConfig(model=str(tiny_model_dir), data_dir=str(data_dir), max_epochs=3, patience=5,
                                         max_train_examples=8, max_eval_examples=8, max_length=64, baselines=False))

    def report(metrics, states):
        if states is not None and metrics["epoch"] == 1:
            raise SystemExit(0)  # what tune.report raises when the scheduler stopped the trial

    with pytest.raises(SystemExit):
        run_group({"task": "cb", "seed": 0, "condition": "sample0", "lr": 0.5}, ctx, None, report, {"sample0": {}})
    mc = client(uri)
    (run,) = tracking.search_study_runs(mc, exp, "stop")
    assert run.info.status == layout.RUNNING and run.data.params["lr"] == "0.5"
    assert tracking.logged_epochs(mc, run.info.run_id) == [1]  # the epoch the scheduler judged is in its history
    plan = dataclasses.replace(plan_of("--study", "lr", "--tasks", "cb", "--num-samples", "1"), study="stop")
    finish_stopped(plan, SimpleNamespace(client=lambda: mc, experiment_id=exp, study="stop"),
                   {"cb-seed0-sample0": "TERMINATED"})
    run = mc.get_run(run.info.run_id)
    assert run.info.status == layout.KILLED and run.data.tags[layout.TAG_STOPPED_BY] == "asha"


def test_stopped_trials_end_killed_and_the_summary_reports_the_best_config(store):
    from ptray.study.summary import render_summary, summarize
    from ptray.study.tuner import finish_stopped

    uri, exp = store
    mc = client(uri)
    plan = plan_of("--study", "lr", "--tasks", "cb", "--num-samples", "3", "--smoke")
    plan = dataclasses.replace(plan, study="search")
    ctx = SimpleNamespace(client=lambda: mc, experiment_id=exp, study="search")
    for k, (lr, loss, status) in enumerate([(0.01, 0.9, "FINISHED"), (0.2, 0.5, "FINISHED"), (0.9, 3.0, "RUNNING")]):
        name = f"cb-seed0-sample{k}"
        run = tracking.create_run(mc, exp, name, layout.run_tags("search", layout.TRAIN, "cb", 0,
                                                                 condition=f"sample{k}"))
        mc.log_param(run.info.run_id, "lr", lr)
        tracking.log_metrics(mc, run.info.run_id, {"final_eval_loss": loss, "final_exact_match": 0.5})
        if status == "FINISHED":
            mc.set_terminated(run.info.run_id, status="FINISHED")
    statuses = {"cb-seed0-sample0": "TERMINATED", "cb-seed0-sample1": "TERMINATED", "cb-seed0-sample2": "TERMINATED"}
    assert finish_stopped(plan, ctx, statuses) == ["cb-seed0-sample2"]
    assert finish_stopped(dataclasses.replace(plan, search={}), ctx, statuses) == []  # no scheduler: nothing
    runs = {r.info.run_name: r for r in tracking.search_study_runs(mc, exp, "search")}
    stopped = runs["cb-seed0-sample2"]
    assert stopped.info.status == layout.KILLED and stopped.data.tags[layout.TAG_STOPPED_BY] == "asha"
    summary = summarize(mc, exp, plan)
    assert summary["train_done"] == 2 and summary["train_stopped"] == ["cb-seed0-sample2"]
    assert summary["train_failed"] == [] and summary["eval_expected"] == 2 * 1 + 1
    assert summary["searched"]["cb"]["config"] == {"lr": "0.2"} and summary["searched"]["cb"]["run"] == \
        "cb-seed0-sample1"
    text = render_summary(summary, plan, "e", exp, uri, "tune", "off", [], 1.0)
    assert "2/3 trials done, 1 stopped early by asha, 0 failed" in text
    assert "best config per task (eval_loss, min):\n    cb    lr 0.2  (eval_loss 0.5000, cb-seed0-sample1)" in text


def test_transfer_names_and_tags_carry_the_source_condition():
    assert layout.transfer_run_name("cb", 0, "rte", "random") == "transfer-cb-seed0-random-on-rte"
    tags = layout.run_tags("s", layout.TRANSFER, seed=0, source="cb", target="rte", condition="random")
    assert tags[layout.TAG_CONDITION] == "random"
    source = (ROOT / "ptray" / "study" / "transfer.py").read_text()
    assert "layout.transfer_run_name(src[\"task\"], src[\"seed\"], target, src.get(\"condition\"))" in source


# ---------------------------------------------------------------------------------------------------------------
# the declared studies end to end on CPUs (one Ray start each): init's conditions, lr's search


def _run(script: str, *argv: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, str(ROOT / "sweeps" / script), *argv], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_init_and_lr_smoke(tmp_path, data_dir):
    caps = ["--smoke", "--data-dir", str(data_dir), "--tasks", "cb", "--seeds", "0", "--max-epochs", "2",
            "--max-train-examples", "8", "--max-eval-examples", "8", "--no-analysis"]
    out = _run("init.py", *caps, cwd=tmp_path)
    sid = re.search(r"study '(init-smoke-\d{8}-\d{6})'", out).group(1)
    assert "4/4 trials done, 0 failed" in out and "5/5 transfer and baseline runs done" in out
    mc = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mc.get_experiment_by_name(f"ptray-{sid}").experiment_id
    runs = tracking.search_study_runs(mc, exp, sid)
    train = {r.info.run_name: r for r in runs if r.data.tags["ptray.kind"] == "train"}
    assert set(train) == {"cb-seed0-text", "cb-seed0-random", "cb-seed0-sample_vocab", "cb-seed0-class_labels"}
    assert {r.data.tags[layout.TAG_CONDITION]: r.data.params["init"] for r in train.values()} == {
        "text": "text", "random": "random", "sample_vocab": "sample_vocab", "class_labels": "class_labels"}
    transfer = [r for r in runs if r.data.tags["ptray.kind"] == "transfer"]
    assert sorted(r.info.run_name for r in transfer) == sorted(f"transfer-{n}-on-cb" for n in train)
    assert all(r.info.status == "FINISHED" for r in runs)

    out = _run("lr.py", *caps[:-7], "--max-epochs", "3", "--max-train-examples", "8", "--max-eval-examples", "8",
               "--num-samples", "4", "--no-analysis", cwd=tmp_path)
    sid = re.search(r"study '(lr-smoke-\d{8}-\d{6})'", out).group(1)
    assert re.search(r"best config per task \(eval_loss, min\):\n    cb    lr [0-9.e-]+  \(eval_loss", out), out
    exp = mc.get_experiment_by_name(f"ptray-{sid}").experiment_id
    train = [r for r in tracking.search_study_runs(mc, exp, sid, kind="train")]
    assert len(train) == 4 and len({r.data.params["lr"] for r in train}) == 4  # four sampled lrs
    statuses = Counter((r.info.status, r.data.tags.get(layout.TAG_STOPPED_BY)) for r in train)
    assert set(statuses) <= {("FINISHED", None), ("KILLED", "asha")} and statuses[("FINISHED", None)] >= 1, statuses
    stopped = statuses[("KILLED", "asha")]
    assert f"{4 - stopped}/4 trials done, {stopped} stopped early by asha, 0 failed" in out
