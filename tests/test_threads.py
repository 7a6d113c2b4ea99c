"""Numbers that depend on where a study ran (issue 32): torch's CPU thread count changes a sum's order, so every run
records it (and the BLAS, oneDNN and CPU capability in use); a Ray trial and its evaluations run on the trial's
CPUs whatever the process's own, and ``--local`` on the count ``--threads`` asks for (torch's own otherwise)."""

from __future__ import annotations

import json

import pytest
import torch

from ptray import layout
from ptray.config import TrainConfig
from ptray.plan import Options
from ptray.study import store, tracking
from ptray.study.context import StudyContext, torch_threads
from ptray.versions import compute_settings


@pytest.fixture
def many_threads():
    """The process on 3 torch threads, more than a trial's default of 1, whatever the machine; restored after."""
    with torch_threads(3):
        yield


def test_the_thread_count_is_the_trial_s_cpus_unless_given():
    assert Options().torch_threads == 1  # one CPU per trial: what Ray gives it (OMP_NUM_THREADS = its CPUs)
    assert Options(cpus_per_trial=2.5).torch_threads == 2 and Options(cpus_per_trial=0.25).torch_threads == 1
    assert Options(cpus_per_trial=4, threads=3).torch_threads == 3


def test_bad_threads_is_one_line(capsys):
    from ptray.study.driver import main

    with pytest.raises(SystemExit) as stop:
        main(["--threads", "0", "--dry-run"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: argument --threads: must be a positive integer, got 0")


def test_compute_settings_say_what_torch_computes_with(many_threads):
    s = compute_settings()
    assert s["torch_threads"] == 3 and s["torch_interop_threads"] == torch.get_num_interop_threads()
    assert s["blas"] in torch.__config__.show() and s["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert s["onednn"] == "off" or s["onednn"] in torch.__config__.show()


def test_a_trial_and_its_evaluations_run_on_the_study_s_threads_and_record_them(tiny_model_dir, data_dir, tmp_path,
                                                                                  many_threads):
    from ptray.study.transfer import transfer_target
    from ptray.study.trial import run_training

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mc = store.client(uri)
    exp = tracking.get_or_create_experiment(mc, "ptray-threads")
    train = TrainConfig(model=str(tiny_model_dir), data_dir=str(data_dir), max_epochs=1, max_train_examples=8,
                        max_eval_examples=8, max_length=64, baselines=False)
    ctx = StudyContext(study="threads", experiment_id=exp, tracking_uri=uri, train=train,
                       model_label=str(tiny_model_dir), data_label=str(data_dir), threads=Options().torch_threads)
    seen = []
    run_training({"task": "cb", "seed": 0}, ctx, None, lambda *_: seen.append(torch.get_num_threads()))
    assert seen == [1, 1] and torch.get_num_threads() == 3  # trained on the trial's 1 thread, the process's kept
    run = tracking.find_run(mc, exp, "threads", "cb-seed0")
    settings = {k: str(v) for k, v in compute_settings().items() if k != "torch_threads"}
    assert {k: run.data.params[k] for k in ("torch_threads", *settings)} == {"torch_threads": "1", **settings}
    transfer_target("cb", [{"task": "cb", "seed": 0, "run_id": run.info.run_id}], ctx)
    for name in ("baseline-none-on-cb", "transfer-cb-seed0-on-cb"):
        assert tracking.find_run(mc, exp, "threads", name).data.params["torch_threads"] == "1", name
    assert torch.get_num_threads() == 3


def test_a_local_study_runs_on_the_threads_asked_for(tiny_model_dir, data_dir, tmp_path, monkeypatch, many_threads):
    """``ptray study --local`` uses the process's threads (3 here: torch's own, every core on a real machine) unless
    ``--threads N`` asks for a Ray trial's count; its evaluations too; each run records the count."""
    from ptray.study.driver import main
    from ptray.study.local import run_dir

    monkeypatch.chdir(tmp_path)
    argv = ["--model", str(tiny_model_dir), "--data-dir", str(data_dir), "--tasks", "copa", "--seeds", "0",
            "--max-epochs", "1", "--max-train-examples", "8", "--max-eval-examples", "8", "--max-length", "128",
            "--no-analysis", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    for study, extra, threads in (("one", [], 3), ("two", ["--threads", "1"], 1)):
        assert main([*argv, "--study", study, "--local", study, *extra]) == 0
        trained = json.loads((run_dir(tmp_path / study, "copa-seed0") / layout.CONFIG_FILE).read_text())
        assert trained["torch_threads"] == threads
        for name in ("transfer-copa-seed0-on-copa", "baseline-none-on-copa"):  # an evaluation's params: run.json
            run = json.loads((run_dir(tmp_path / study, name) / "run.json").read_text())
            assert run["params"]["torch_threads"] == threads, name
        assert torch.get_num_threads() == 3
