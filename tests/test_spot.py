"""SPoT (init 'prompt'): a prompt starts from a trained prompt's rows (an adapter folder, a run folder, or in a study
a train run by name, tagged ptray.init_from); sweeps/spot.py's two phases; and, slow, the spot study's --smoke run end
to end with a user task trained and a held-out user task and WiC as transfer-only targets."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from ptray import layout
from ptray.config import TrainConfig
from ptray.errors import PtrayError
from ptray.lm.prompt import init_prompt, load_adapter, save_adapter, source_prompt
from ptray.study import store, tracking
from ptray.study.context import StudyContext
from ptray.study.study_file import load_study, parse_study

ROOT = Path(__file__).resolve().parents[1]


def _spot_script():
    spec = importlib.util.spec_from_file_location("spot_script", ROOT / "sweeps" / "spot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prompt_init_copies_the_source_rows_and_its_length():
    emb = torch.randn(50, 8)
    src = torch.randn(5, 8)
    assert torch.equal(init_prompt(emb, None, "prompt", source=src), src)  # the source's length, its rows
    assert torch.equal(init_prompt(emb, None, "prompt", num_tokens=3, source=src), src[:3])  # the first rows
    longer = init_prompt(emb, None, "prompt", num_tokens=12, source=src)  # cycled, as TEXT cycles its tokens
    assert torch.equal(longer, torch.cat([src, src, src[:2]]))
    with pytest.raises(PtrayError, match="embeddings are 8 wide; a prompt starts only from one trained on the same"):
        init_prompt(emb, None, "prompt", source=torch.randn(5, 4))
    with pytest.raises(PtrayError, match="needs --init-source"):
        TrainConfig(init="prompt")
    with pytest.raises(PtrayError, match="read only with init 'prompt'"):
        TrainConfig(init_source="rte-seed0")


def test_source_prompt_reads_an_adapter_folder_and_a_run_folder(tmp_path):
    rows = torch.randn(4, 16)
    save_adapter(rows, tmp_path / "run" / layout.PROMPT_DIR, "tiny", "init text")
    assert torch.equal(source_prompt(tmp_path / "run" / layout.PROMPT_DIR), rows)  # the adapter folder
    assert torch.equal(source_prompt(tmp_path / "run"), rows)  # a run folder (ptray train's output)
    with pytest.raises(PtrayError, match="is not a prompt adapter folder"):
        source_prompt(tmp_path)
    with pytest.raises(PtrayError, match="is not a folder"):
        source_prompt(tmp_path / "nope")


def test_a_spot_run_starts_from_the_source_run_folder(tiny_model_dir, data_dir, tmp_path):
    from ptray.training.run_folder import save_run
    from ptray.training.train import train

    base = dict(model=str(tiny_model_dir), data_dir=str(data_dir), max_epochs=1, max_train_examples=8,
                max_eval_examples=8, max_length=64, baselines=False)
    source = save_run(train(TrainConfig(task="cb", seed=0, num_tokens=6, **base)), tmp_path / "cb-run")
    rows = load_adapter(source / layout.PROMPT_DIR)
    # a learning rate too small to move it: the trained prompt is the init, which is the source's rows
    result = train(TrainConfig(task="rte", seed=0, init="prompt", init_source=str(source), lr=1e-12, **base))
    assert result.resolved["num_tokens"] == result.resolved["init_source_tokens"] == 6
    assert result.resolved["init"] == "prompt" and result.resolved["init_source"] == str(source)
    assert torch.allclose(result.prompt, rows, atol=1e-6)
    shorter = train(TrainConfig(task="rte", seed=0, init="prompt", init_source=str(source), num_tokens=4, lr=1e-12,
                                **base))
    assert shorter.resolved["num_tokens"] == 4 and torch.allclose(shorter.prompt, rows[:4], atol=1e-6)


def test_a_study_run_starts_from_a_train_run_of_the_study(tiny_model_dir, data_dir, tmp_path):
    from ptray.study.trial import run_training

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mc = store.client(uri)
    exp = tracking.get_or_create_experiment(mc, "ptray-spot-unit")
    fields = dict(model=str(tiny_model_dir), data_dir=str(data_dir), max_epochs=1, max_train_examples=8,
                  max_eval_examples=8, max_length=64, baselines=False)

    def ctx(**train):
        return StudyContext(study="spot-unit", experiment_id=exp, tracking_uri=uri,
                            train=TrainConfig(**{**fields, **train}), model_label=str(tiny_model_dir),
                            data_label=str(data_dir), params={"study": "spot-unit"})

    def report(*_):
        return None

    run_training({"task": "cb", "seed": 0}, ctx(), None, report)
    cb = tracking.find_run(mc, exp, "spot-unit", "cb-seed0")
    rows = load_adapter(mc.download_artifacts(cb.info.run_id, layout.PROMPT_DIR, str(tmp_path / "cb")))
    # the run name with {seed}: each target seed starts from the source prompt of its own seed
    spot = ctx(init="prompt", init_source="cb-seed{seed}", lr=1e-12)
    with pytest.raises(PtrayError, match="init source 'cb-seed1' of rte seed 1 is neither a folder nor a finished "
                                         "train run"):
        run_training({"task": "rte", "seed": 1}, spot, None, report)
    spot_study = StudyContext(**{**spot.__dict__, "study": "spot-unit-2"})  # another study of the experiment
    run_training({"task": "rte", "seed": 0}, spot_study, None, report)
    run = tracking.find_run(mc, exp, "spot-unit-2", "rte-seed0")
    assert run.info.status == "FINISHED" and run.data.tags[layout.TAG_INIT_FROM] == "cb-seed0"
    assert run.data.params["init"] == "prompt" and run.data.params["init_source"] == "cb-seed0"
    assert run.data.params["init_source_tokens"] == run.data.params["num_tokens"] == str(rows.shape[0])
    started = load_adapter(mc.download_artifacts(run.info.run_id, layout.PROMPT_DIR, str(tmp_path / "rte")))
    assert torch.allclose(started, rows, atol=1e-6)
    # a second study of the experiment trains its own cb-seed0 (SPoT run twice): a bare run name is ambiguous,
    # STUDY/RUN names one (issue 32)
    other = StudyContext(**{**ctx(num_tokens=3).__dict__, "study": "spot-unit-3"})
    run_training({"task": "cb", "seed": 0}, other, None, report)
    third = StudyContext(**{**spot.__dict__, "study": "spot-unit-4"})
    with pytest.raises(PtrayError, match=r"init source 'cb-seed0' names finished train runs of several studies of "
                                         r"the experiment \(spot-unit, spot-unit-3\); name one as STUDY/RUN \(e.g. "
                                         r"spot-unit-3/cb-seed0\), or give an adapter folder"):
        run_training({"task": "rte", "seed": 0}, third, None, report)
    named = StudyContext(**{**spot.__dict__, "study": "spot-unit-5",
                            "train": TrainConfig(**{**fields, "init": "prompt", "lr": 1e-12,
                                                    "init_source": "spot-unit/cb-seed{seed}"})})
    run_training({"task": "rte", "seed": 0}, named, None, report)
    run = tracking.find_run(mc, exp, "spot-unit-5", "rte-seed0")
    assert run.info.status == "FINISHED" and run.data.tags[layout.TAG_INIT_FROM] == "spot-unit/cb-seed0"
    started = load_adapter(mc.download_artifacts(run.info.run_id, layout.PROMPT_DIR, str(tmp_path / "rte5")))
    assert torch.allclose(started, rows, atol=1e-6)  # spot-unit's prompt, not spot-unit-3's (3 rows)
    missing = StudyContext(**{**named.__dict__, "study": "spot-unit-6",
                              "train": dataclasses.replace(named.train, init_source="nope/cb-seed{seed}")})
    with pytest.raises(PtrayError, match="init source 'nope/cb-seed0' of rte seed 0 is neither a folder nor a "
                                         "finished train run of study 'nope' of the experiment"):
        run_training({"task": "rte", "seed": 0}, missing, None, report)


def test_spot_run_twice_smoke_runs_are_their_own_studies_and_experiments(tmp_path, monkeypatch, capsys):
    """Two smoke runs (and the real study) never share an experiment, and phase 2 names its sources by its own
    phase 1's study id (issue 32: the second smoke run's phase 2 found two cb-seed0 and failed every trial)."""
    spot = _spot_script()
    calls = []
    monkeypatch.setattr(spot.driver, "main", lambda argv, analyse=None, prog=None, study=None: calls.append(
        (argv, study)) or 0)
    stamps = iter(["20260101-120000", "20260101-120500", "20260101-121000"])
    monkeypatch.setattr(spot.time, "strftime", lambda fmt: next(stamps))
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert spot.main(["--smoke", "--tasks", "cb,rte", "--seeds", "0", "--data-dir", "d"]) == 0
    assert spot.main(["--tasks", "cb", "--seeds", "0"]) == 0  # the real study
    studies = [study for _, study in calls]
    assert studies == ["spot-sources-smoke-20260101-120000", "spot-smoke-20260101-120000",
                       "spot-sources-smoke-20260101-120500", "spot-smoke-20260101-120500", "spot-sources", "spot"]
    experiments = [argv[argv.index("--experiment") + 1] for argv, _ in calls]
    assert experiments == ["ptray-spot-smoke-20260101-120000"] * 2 + ["ptray-spot-smoke-20260101-120500"] * 2 + [
        "ptray-spot"] * 2
    second = load_study(calls[3][0][1])  # the second smoke run's phase 2, as written
    assert second.name == "spot-smoke-20260101-120500"
    assert second.conditions["from-cb"]["init_source"] == "spot-sources-smoke-20260101-120500/cb-seed{seed}"
    assert load_study(calls[2][0][1]).name == "spot-sources-smoke-20260101-120500"
    out = capsys.readouterr().out
    assert "SPoT smoke run spot-smoke-20260101-120500 in MLflow experiment 'ptray-spot-smoke-20260101-120500'" in out
    # a smoke run resumes by its id, with its own stamp
    calls.clear()
    assert spot.main(["--smoke", "--resume", "--study", "spot-smoke-20260101-120000", "--tasks", "cb,rte",
                      "--seeds", "0"]) == 0
    assert [study for _, study in calls] == ["spot-sources-smoke-20260101-120000", "spot-smoke-20260101-120000"]
    # a phase that did not finish: the command that finishes both, with the run's id and flags
    monkeypatch.setattr(spot.driver, "main", lambda argv, analyse=None, prog=None, study=None: 1)
    capsys.readouterr()
    assert spot.main(["--smoke", "--tasks", "cb,rte", "--seeds", "0", "--data-dir", "d"]) == 1
    assert capsys.readouterr().err.splitlines()[-2:] == [
        "finish both phases with:", "  python sweeps/spot.py --resume --study spot-smoke-20260101-121000 --tasks "
                                    "cb,rte --seeds 0 --smoke --data-dir d"]
    assert spot.main(["--smoke", "--resume"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --resume --smoke needs --study with the smoke run's id, NAME-smoke-<date>-<time> (each smoke run is "
        "its own pair of studies; it printed its id when it started), not 'spot'")


def test_spot_phases_from_the_declaration():
    spot = _spot_script()
    decl = load_study("spot")
    assert decl.train == {"max_epochs": 50} and decl.conditions["text"] == {"max_epochs": 5}
    sources, targets = spot.phase_texts(decl, ("cb", "rte"), (0, 1))
    first, second = parse_study(sources), parse_study(targets)
    assert first.name == "spot-sources" and not first.conditions and first.size == 4 and first.train == decl.train
    assert second.name == "spot" and list(second.conditions) == ["text", "from-cb", "from-rte"]
    # the source run named in phase 1's study: unambiguous in an experiment holding other studies (issue 32)
    assert second.conditions["from-rte"] == {"init": "prompt", "init_source": "spot-sources/rte-seed{seed}",
                                             "max_epochs": 5}
    assert second.conditions["text"] == {"max_epochs": 5} and second.size == 3 * 2 * 2
    _, short = spot.phase_texts(decl, ("cb",), (0,), spot_epochs=1)
    assert {c: o["max_epochs"] for c, o in parse_study(short).conditions.items()} == {"text": 1, "from-cb": 1}
    bad = parse_study('name = "x"\ndescription = "d"\n[conditions.text]\nmax_epochs = 5\n')
    with pytest.raises(PtrayError, match=r"a SPoT study declares \[conditions.text\] and \[conditions.spot\]"):
        spot.phase_texts(bad, ("cb",), (0,))


USER_TASK = '''
name = "{name}"
version = 1
labels = ["entailment", "not_entailment"]
init_text = "Does the text imply the claim?"
template = """
Text: {{premise}}
Claim: {{hypothesis}}
"""
[fields]
premise = "text"
hypothesis = "text"
[verbalizer]
entailment = "yes"
not_entailment = "no"
[data]
dir_name = "RTE"
splits = {splits}
'''


@pytest.mark.slow
def test_spot_smoke_study_end_to_end(tmp_path, data_dir):
    """sweeps/spot.py --smoke on CPUs: phase 1 trains cb and a user task (declared in a file, over RTE's files),
    phase 2 tunes each from each and from text for 1 epoch; both transfer grids evaluate every prompt on the tasks,
    WiC and a held-out user task (validation only); the second phase's runs are tagged with their source."""
    mine, held = tmp_path / "mine.toml", tmp_path / "held.toml"
    mine.write_text(USER_TASK.format(name="my_rte", splits='["train", "val"]'))
    held.write_text(USER_TASK.format(name="held_rte", splits='["val"]'))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    argv = [sys.executable, str(ROOT / "sweeps" / "spot.py"), "--smoke", "--data-dir", str(data_dir), "--tasks",
            "cb,my_rte", "--seeds", "0", "--spot-epochs", "1", "--task-file", str(mine), "--task-file", str(held),
            "--targets", "wic,held_rte", "--no-analysis", "--max-eval-examples", "16", "--max-train-examples", "16"]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    mc = store.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (experiment,) = [e.name for e in mc.search_experiments() if e.name.startswith("ptray-spot")]
    assert experiment.startswith("ptray-spot-smoke-")  # its own experiment, never the real study's ptray-spot
    exp = mc.get_experiment_by_name(experiment).experiment_id
    runs = tracking.search_runs(mc, exp)
    assert all(r.info.status == "FINISHED" for r in runs)
    studies = Counter(r.data.tags[layout.TAG_STUDY] for r in runs)
    (sources,) = [s for s in studies if s.startswith("spot-sources-smoke-")]
    (targets,) = [s for s in studies if s.startswith("spot-smoke-")]
    kinds = {s: Counter(r.data.tags[layout.TAG_KIND] for r in runs if r.data.tags[layout.TAG_STUDY] == s)
             for s in (sources, targets)}
    # phase 1: 2 prompts on 4 targets (cb, my_rte, wic, held_rte) + 4 baselines
    assert kinds[sources] == {"train": 2, "transfer": 8, "baseline": 4}
    # phase 2: 2 tasks x 3 conditions (text, from-cb, from-my_rte), each on the 4 targets
    assert kinds[targets] == {"train": 6, "transfer": 24, "baseline": 4}
    train = {r.info.run_name: r for r in runs if r.data.tags[layout.TAG_KIND] == "train"
             and r.data.tags[layout.TAG_STUDY] == targets}
    assert sorted(train) == sorted(f"{t}-seed0-{c}" for t in ("cb", "my_rte") for c in ("text", "from-cb",
                                                                                         "from-my_rte"))
    assert sources == "spot-sources-" + targets.removeprefix("spot-")  # one stamp for both phases
    assert train["cb-seed0-from-my_rte"].data.tags[layout.TAG_INIT_FROM] == f"{sources}/my_rte-seed0"
    assert train["my_rte-seed0-from-cb"].data.params["init_source"] == f"{sources}/cb-seed0"
    assert layout.TAG_INIT_FROM not in train["cb-seed0-text"].data.tags
    assert all(r.data.params["max_epochs"] == "1" for r in train.values())
    # the held-out targets: evaluated, never trained
    trained = {r.data.tags[layout.TAG_TASK] for r in runs if r.data.tags[layout.TAG_KIND] == "train"}
    targets_seen = {r.data.tags[layout.TAG_TARGET] for r in runs if r.data.tags[layout.TAG_KIND] != "train"}
    assert trained == {"cb", "my_rte"} and targets_seen == {"cb", "my_rte", "wic", "held_rte"}
    plan = tracking.read_plan(mc, experiment, targets)
    assert plan["targets"] == ["wic", "held_rte"]
    assert [d["name"] for d in plan["task_declarations"]] == ["my_rte", "held_rte"]


def test_the_spot_declaration_alone_is_refused_naming_its_script(data_dir, capsys):
    """Its conditions name the source task as {source}, which only sweeps/spot.py fills in (phase by phase)."""
    from ptray.study.driver import main

    assert main(["--study", "spot", "--data-dir", str(data_dir), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("it runs in two phases (the sources, then every target from each): run "
                                             "it with python sweeps/spot.py")
