"""The local study (one process, no Ray, no MLflow: run folders) and ``ptray publish`` (run folders -> MLflow)."""

import json

import pytest
import torch

from ptray import layout
from ptray.config import TrainConfig
from ptray.errors import PtrayError
from ptray.lm.prompt import load_adapter
from ptray.plan import Plan
from ptray.study.local import finished_runs, run_dir, run_local


def _plan(tiny_model_dir, data_dir, **train):
    cfg = dict(model=str(tiny_model_dir), data_dir=str(data_dir), max_epochs=2, max_train_examples=8,
               max_eval_examples=8, max_length=128, batch_size=4, patience=5)
    return Plan(study="loc", tasks=("cb", "copa"), seeds=(0,), train=TrainConfig(**{**cfg, **train}))


def test_local_study_writes_every_run_folder_and_resumes_without_redoing(tiny_model_dir, data_dir, tmp_path):
    plan = _plan(tiny_model_dir, data_dir)
    counts = run_local(plan, tmp_path / "s", progress=False)
    assert counts == {"train": 2, "evaluations": 2 + 4}  # 2 baselines, 2 prompts x 2 targets
    runs = finished_runs(tmp_path / "s")
    assert sorted(runs) == ["baseline-none-on-cb", "baseline-none-on-copa", "cb-seed0", "copa-seed0",
                            "transfer-cb-seed0-on-cb", "transfer-cb-seed0-on-copa", "transfer-copa-seed0-on-cb",
                            "transfer-copa-seed0-on-copa"]
    cb = run_dir(tmp_path / "s", "cb-seed0")
    assert sorted(p.name for p in cb.iterdir()) == ["config.json", "history.json", "metrics.json",
                                                    "predictions.json", "prompt", "run.json"]
    assert runs["cb-seed0"]["tags"] == layout.run_tags("loc", layout.TRAIN, "cb", 0)
    assert runs["cb-seed0"]["params"]["study"] == "loc" and "group_size" not in runs["cb-seed0"]["params"]
    assert len(json.loads((cb / "history.json").read_text())) == 2
    assert not (tmp_path / "s" / "checkpoints" / "cb-seed0").exists()  # removed once the run is written
    # the diagonal transfer run scores the same prompt on its own task as the train run's final evaluation
    diag = json.loads((run_dir(tmp_path / "s", "transfer-cb-seed0-on-cb") / "metrics.json").read_text())
    final = json.loads((cb / "metrics.json").read_text())
    assert diag["exact_match"] == final["exact_match"] and diag["rank_accuracy"] == final["rank_accuracy"]
    assert run_local(plan, tmp_path / "s", resume=True, progress=False) == {"train": 0, "evaluations": 0}


def test_a_stopped_local_study_resumes_from_its_checkpoint_to_the_same_prompt(tiny_model_dir, data_dir, tmp_path,
                                                                             monkeypatch):
    import ptray.training.run_folder as run_folder

    plan = _plan(tiny_model_dir, data_dir)
    run_local(plan, tmp_path / "straight", progress=False)
    real = run_folder.save_run

    def stop(*args, **kwargs):  # the process dies after the first prompt's last epoch was checkpointed
        raise KeyboardInterrupt

    monkeypatch.setattr(run_folder, "save_run", stop)
    with pytest.raises(KeyboardInterrupt):
        run_local(plan, tmp_path / "stopped", progress=False)
    assert (tmp_path / "stopped" / "checkpoints" / "cb-seed0" / "state.pt").is_file()
    assert finished_runs(tmp_path / "stopped") == {}
    monkeypatch.setattr(run_folder, "save_run", real)
    assert run_local(plan, tmp_path / "stopped", resume=True, progress=False)["train"] == 2
    for name in ("cb-seed0", "copa-seed0"):
        a = load_adapter(run_dir(tmp_path / "straight", name) / "prompt")
        b = load_adapter(run_dir(tmp_path / "stopped", name) / "prompt")
        assert torch.equal(a, b)


def test_resume_refuses_another_plan_and_a_new_study_a_used_folder(tiny_model_dir, data_dir, tmp_path):
    plan = _plan(tiny_model_dir, data_dir, max_epochs=1)
    run_local(plan, tmp_path / "s", progress=False)
    with pytest.raises(PtrayError, match=r"was started with another plan \(differs in: max_epochs\)"):
        run_local(_plan(tiny_model_dir, data_dir, max_epochs=3), tmp_path / "s", resume=True)
    with pytest.raises(PtrayError, match="already holds files; choose a new --local or resume it with --resume"):
        run_local(plan, tmp_path / "s")
    with pytest.raises(PtrayError, match="is not a local study folder"):
        run_local(plan, tmp_path / "empty", resume=True)


def test_publish_logs_the_runs_as_the_ray_study_does_and_twice_is_once(tiny_model_dir, data_dir, tmp_path):
    from mlflow import MlflowClient

    from ptray.study.publish import publish

    plan = _plan(tiny_model_dir, data_dir)
    run_local(plan, tmp_path / "s", progress=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = publish(tmp_path / "s", uri)
    assert out["published"] == 8 and out["skipped"] == 0 and out["experiment"] == "ptray-loc"
    again = publish(tmp_path / "s", uri)
    assert again["published"] == 0 and again["skipped"] == 8
    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([out["experiment_id"]])}
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs.values())
    train = runs["cb-seed0"]
    assert {k: v for k, v in train.data.tags.items() if k.startswith("ptray.")} == \
        layout.run_tags("loc", layout.TRAIN, "cb", 0)
    history = json.loads((run_dir(tmp_path / "s", "cb-seed0") / "history.json").read_text())
    logged = client.get_metric_history(train.info.run_id, "eval_loss")
    assert [(m.step, m.value) for m in logged] == [(h["epoch"], h["eval_loss"]) for h in history]
    assert train.data.metrics["final_rank_accuracy"] == json.loads(
        (run_dir(tmp_path / "s", "cb-seed0") / "metrics.json").read_text())["rank_accuracy"]
    assert sorted(a.path for a in client.list_artifacts(train.info.run_id)) == sorted(
        ["config.json", "history.json", "metrics.json", "predictions.json", "prompt"])
    transfer = runs["transfer-copa-seed0-on-cb"]
    assert transfer.data.params["source"] == "copa" and "delta_rank_accuracy" in transfer.data.metrics
    from ptray.study import tracking

    assert tracking.read_plan(client, "ptray-loc", "loc") == plan.to_json()


def test_publish_refuses_a_folder_that_is_not_a_study(tmp_path):
    from ptray.study.publish import main

    assert main([str(tmp_path)]) == 2


def test_ptray_study_local_runs_publishes_and_resumes(tiny_model_dir, data_dir, tmp_path, capsys, monkeypatch):
    from ptray.study.driver import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    argv = ["--model", str(tiny_model_dir), "--data-dir", str(data_dir), "--tasks", "copa", "--seeds", "0",
            "--max-epochs", "1", "--max-train-examples", "8", "--max-eval-examples", "8", "--max-length", "128",
            "--study", "cli", "--tracking-uri", uri, "--local", "study"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "local study cli: 1 train runs and 2 evaluations written to" in out
    assert "published 3 runs into MLflow experiment 'ptray-cli'" in out
    assert "analysis: not run here" in out  # no analysis passed in (the entry script passes analysis.run)
    assert main(["--resume", "--local", "study", "--study", "cli", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "0 train runs and 0 evaluations written" in out and "published 0 runs" in out
    assert main(["--resume", "--local", "study", "--tracking-uri", uri]) == 0  # the study id from the folder
    out = capsys.readouterr().out
    assert "published 0 runs into MLflow experiment 'ptray-cli'" in out


def test_compile_reaches_a_local_studys_training_and_evaluation(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """``--compile`` is a run option (not in the plan): ``ptray study --local`` passed it nowhere, so a study asked
    to compile ran uncompiled. Now its training and its transfer evaluations compile the blocks (counted here,
    not compiled) and its train run records it; a resume without it runs uncompiled."""
    import ptray.lm.load
    from ptray.study.driver import main

    compiled = []
    monkeypatch.setattr(ptray.lm.load, "compile_blocks", lambda model: compiled.append(type(model).__name__))
    monkeypatch.chdir(tmp_path)
    argv = ["--model", str(tiny_model_dir), "--data-dir", str(data_dir), "--tasks", "copa", "--seeds", "0",
            "--max-epochs", "1", "--max-train-examples", "8", "--max-eval-examples", "8", "--max-length", "128",
            "--study", "comp", "--no-analysis", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    assert main([*argv, "--local", "study", "--compile"]) == 0
    trained = json.loads((run_dir(tmp_path / "study", "copa-seed0") / layout.CONFIG_FILE).read_text())
    assert trained["compile"] is True
    assert len(compiled) == 2  # the training's model and the transfer grid's


def test_the_local_study_needs_neither_ray_nor_mlflow(tiny_model_dir, data_dir, tmp_path):
    """As on a GPU machine with torch, transformers, peft and accelerate only: the study runs, and says how to
    publish it where MLflow is."""
    import subprocess
    import sys

    code = ("import sys\n"
            "for m in ('mlflow', 'ray', 'datasets'):\n"
            "    sys.modules[m] = None\n"
            "from ptray.command import main\n"
            f"sys.exit(main(['study', '--model', {str(tiny_model_dir)!r}, '--data-dir', {str(data_dir)!r}, "
            "'--tasks', 'copa', '--seeds', '0', '--max-epochs', '1', '--max-train-examples', '8', "
            "'--max-eval-examples', '8', '--max-length', '128', '--local', 'study', '--study', 'gpu']))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MLflow is not installed here: publish it where it is with" in out.stdout
    assert sorted(finished_runs(tmp_path / "study")) == ["baseline-none-on-copa", "copa-seed0",
                                                         "transfer-copa-seed0-on-copa"]


def test_a_local_study_with_conditions_names_and_tags_each_prompt(tiny_model_dir, data_dir, tmp_path):
    import dataclasses

    plan = dataclasses.replace(_plan(tiny_model_dir, data_dir, max_epochs=1), tasks=("copa",),
                               conditions={"text": {"init": "text"}, "random": {"init": "random"}})
    assert run_local(plan, tmp_path / "s", progress=False) == {"train": 2, "evaluations": 1 + 2}
    runs = finished_runs(tmp_path / "s")
    assert sorted(runs) == ["baseline-none-on-copa", "copa-seed0-random", "copa-seed0-text",
                            "transfer-copa-seed0-random-on-copa", "transfer-copa-seed0-text-on-copa"]
    assert runs["copa-seed0-random"]["tags"][layout.TAG_CONDITION] == "random"
    assert runs["copa-seed0-random"]["params"]["init"] == "random"
    assert runs["transfer-copa-seed0-random-on-copa"]["params"]["source_condition"] == "random"
    with pytest.raises(PtrayError, match="a search needs Ray Tune's scheduler: run this study without --local"):
        run_local(dataclasses.replace(plan, conditions={}, search={"lr": {"distribution": "loguniform", "low": 1e-3,
                                                                           "high": 1.0}}, num_samples=2),
                  tmp_path / "search", progress=False)
    assert not (tmp_path / "search").exists()


@pytest.mark.slow  # a Ray study, a local study, and the analysis of each
def test_ray_and_local_studies_give_the_same_experiment_and_report(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """The same small study run by Ray and run locally then published: the same runs, tags, params and metrics in
    MLflow, and the analysis turns both into the same files and columns (equal numbers: CPU runs are exact)."""
    import pandas as pd
    from mlflow import MlflowClient

    import analysis
    from ptray.study.driver import main

    monkeypatch.chdir(tmp_path)
    common = ["--model", str(tiny_model_dir), "--data-dir", str(data_dir), "--tasks", "cb,copa", "--seeds", "0,1",
              "--max-epochs", "2", "--max-train-examples", "8", "--max-eval-examples", "8", "--max-length", "128",
              "--study", "same"]
    uri_ray, uri_local = f"sqlite:///{tmp_path / 'ray.db'}", f"sqlite:///{tmp_path / 'local.db'}"
    assert main([*common, "--tracking-uri", uri_ray, "--analysis-dir", str(tmp_path / "a-ray")],
                analyse=analysis.run) == 0
    # --threads 1: a Ray trial's count (1 CPU per trial), asked for to reproduce the Ray study's numbers
    assert main([*common, "--tracking-uri", uri_local, "--local", "study", "--threads", "1", "--analysis-dir",
                 str(tmp_path / "a-local")], analyse=analysis.run) == 0

    def contents(uri):
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("ptray-same")
        out = {}
        for r in client.search_runs([exp.experiment_id]):
            if r.data.tags.get("ptray.kind") == "analysis":
                continue
            tags = {k: v for k, v in r.data.tags.items() if k.startswith("ptray.") and k not in (
                "ptray.node", "ptray.ray_node_id")}
            params = {k: v for k, v in r.data.params.items() if k not in ("model_digest", "data_digest")}
            out[r.info.run_name] = (r.info.status, tags, params, r.data.metrics)
        return out

    ray_runs, local_runs = contents(uri_ray), contents(uri_local)
    ray_ids, local_ids = ({r.info.run_id: r.info.run_name for r in MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("ptray-same").experiment_id])} for uri in (uri_ray, uri_local))
    assert sorted(ray_runs) == sorted(local_runs) and len(ray_runs) == 4 + 4 * 2 + 2
    for name, (status, tags, params, metrics) in ray_runs.items():
        l_status, l_tags, l_params, l_metrics = local_runs[name]
        assert (status, tags) == (l_status, l_tags), name
        assert sorted(params) == sorted(l_params), (name, set(params) ^ set(l_params))
        ids = ("code_version", "source_run_id")  # run ids differ between two stores; checked by name below
        assert {k: v for k, v in params.items() if k not in ids} == \
            {k: v for k, v in l_params.items() if k not in ids}, name
        if "source_run_id" in params:
            source = f"{params['source']}-seed{params['source_seed']}"
            assert local_ids[l_params["source_run_id"]] == source and ray_ids[params["source_run_id"]] == source
        timing = ("train_tokens_per_s", "epoch_seconds")
        assert {k: v for k, v in metrics.items() if k not in timing} == \
            pytest.approx({k: v for k, v in l_metrics.items() if k not in timing}), name
    ray_files = sorted(p.name for p in (tmp_path / "a-ray").iterdir())
    assert ray_files == sorted(p.name for p in (tmp_path / "a-local").iterdir())
    for name in ("transfer.csv", "table1_norms.csv", "distances.csv"):
        a, b = pd.read_csv(tmp_path / "a-ray" / name), pd.read_csv(tmp_path / "a-local" / name)
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-5)  # sqrt of ~0: noise


def test_dry_run_of_a_local_study_describes_it_and_what_is_left(tiny_model_dir, data_dir, tmp_path, capsys,
                                                                monkeypatch):
    """``--local DIR --dry-run`` describes this process's run (no Ray, no Tune folder, no retries); on ``--resume``
    it says what is left from the folder: unfinished prompts with their checkpointed epoch, evaluations."""
    import ptray.training.run_folder as run_folder
    from ptray.study.driver import main

    monkeypatch.chdir(tmp_path)
    argv = ["--model", str(tiny_model_dir), "--data-dir", str(data_dir), "--tasks", "cb,copa", "--seeds", "0",
            "--max-epochs", "2", "--max-train-examples", "8", "--max-eval-examples", "8", "--max-length", "128",
            "--study", "dry", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--local", "study"]
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "  local      this process, no Ray" in out and f"run folders in {tmp_path / 'study'}" in out
    assert "  ray " not in out and "Tune" not in out and "retries" not in out and "  left" not in out
    assert "2 prompts (cb, copa x seeds 0)" in out and "6 evaluations" in out
    assert "  analysis   at the end, report in outputs/analysis/ptray-dry (later: " in out
    assert not (tmp_path / "study").exists()  # a dry run writes nothing

    def stop(*args, **kwargs):  # stopped after cb-seed0's last epoch was checkpointed
        raise KeyboardInterrupt

    real = run_folder.save_run
    monkeypatch.setattr(run_folder, "save_run", stop)
    assert main(argv) == 130
    monkeypatch.setattr(run_folder, "save_run", real)
    capsys.readouterr()
    resume = ["--resume", "--local", "study", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    assert main([*resume, "--dry-run", "--analysis-dir", "study/analysis"]) == 0
    out = capsys.readouterr().out
    assert "study 'dry' (resume)" in out
    assert f"  analysis   at the end, report in {tmp_path / 'study' / 'analysis'} (later: " in out
    assert ("  left       2 of 2 prompts to train: cb-seed0 (after epoch 2) copa-seed0; 6 of 6 evaluations; "
            "0 prompts finished") in out
    assert main(resume) == 0
    capsys.readouterr()
    assert main([*resume, "--dry-run"]) == 0
    assert "  left       nothing: every prompt and evaluation is finished" in capsys.readouterr().out


def test_a_second_process_on_a_running_local_study_is_refused(tiny_model_dir, data_dir, tmp_path):
    """While another process holds a study folder (a study running in the background), a resume or a publish of
    the same folder is refused in one line naming the holder, and nothing is trained twice; once the holder is
    killed, it resumes."""
    from ptray.study.local import folder_lock

    plan = _plan(tiny_model_dir, data_dir, max_epochs=1)
    folder = tmp_path / "s"
    run_local(plan, folder, progress=False)
    (run_dir(folder, "copa-seed0") / "run.json").unlink()  # as if copa-seed0 were still to train
    import subprocess
    import sys

    from ptray.study.publish import publish

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ptray.study.local import folder_lock\n"
        f"with folder_lock({str(folder)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for attempt in (lambda: run_local(plan, folder, resume=True, progress=False),
                        lambda: publish(folder, f"sqlite:///{tmp_path / 'm.db'}")):
            with pytest.raises(PtrayError, match=rf"is in use \(pid {holder.pid} on .+\): it is running, "
                                                 rf"publishing or being analysed") as info:
                attempt()
            assert "\n" not in str(info.value)
    finally:
        holder.kill()  # killed, not ended: the kernel drops its lock all the same
        holder.wait()
    assert run_local(plan, folder, resume=True, progress=False)["train"] == 1
    with folder_lock(folder):  # re-entrant in one process: the study holds it while it publishes
        assert publish(folder, f"sqlite:///{tmp_path / 'm.db'}")["published"] == 8
