"""The trial and transfer adapters without Ray: the training adapter (checkpoint -> MLflow order, resume into the
same run, no duplicate epochs, no retraining of a finished run), the transfer evaluations, and the bundles that
carry files to nodes."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from ptray import layout, tracking
from ptray.bundle import Bundle
from ptray.config import TrainConfig
from ptray.context import StudyContext
from ptray.prompt import load_adapter
from ptray.transfer import transfer_target
from ptray.trial import load_checkpoint, run_training, save_checkpoint

EPOCHS = 3


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one costs seconds); each test uses its own study id."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlruns') / 'mlflow.db'}"
    mc = tracking.client(uri)
    return uri, tracking.get_or_create_experiment(mc, "ptray-test-trial")


def make_ctx(store, study, tiny_model_dir, data_dir, **train) -> StudyContext:
    uri, exp = store
    fields = dict(model=str(tiny_model_dir), data_dir=str(data_dir), max_epochs=EPOCHS, patience=10, batch_size=8,
                  max_train_examples=16, max_eval_examples=16, max_length=64)
    fields.update(train)
    return StudyContext(study=study, experiment_id=exp, tracking_uri=uri, train=TrainConfig(**fields),
                        model_label=str(tiny_model_dir), data_label=str(data_dir), params={"study": study})


class Recorder:
    """A stand-in for tune.report: keeps each checkpoint (as Tune persists it) and the reported metrics."""

    def __init__(self, tmp: Path, die_after_checkpoint_of_epoch: int | None = None):
        self.tmp, self.die = tmp, die_after_checkpoint_of_epoch
        self.checkpoints: list[Path] = []
        self.metrics: list[dict] = []

    def __call__(self, metrics, state, run_id):
        self.metrics.append(dict(metrics))
        if state is not None:
            folder = self.tmp / f"ckpt{state['epoch']}"
            folder.mkdir(parents=True)
            save_checkpoint(folder, state, run_id)
            self.checkpoints.append(folder)
            if state["epoch"] == self.die:
                raise SystemExit("node lost")  # after the checkpoint, before the epoch reaches MLflow


def test_bundle_round_trip_and_shared_copy(tmp_path):
    src = tmp_path / "src"
    (src / "CB").mkdir(parents=True)
    (src / "CB" / "train.jsonl").write_bytes(b'{"a": 1}\n')
    (src / "CB" / "val.jsonl").write_bytes(b'{"b": 2}\n')
    bundle = Bundle.pack(src)
    assert sorted(bundle.files) == ["CB/train.jsonl", "CB/val.jsonl"]
    assert Bundle.pack(src).digest == bundle.digest  # stable: --resume compares it
    # Several trials on one node materialise the same bundle at once: one complete copy, same path for all.
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(bundle.materialize(tmp_path / "cache"))) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(set(paths)) == 1 and paths[0].name == bundle.digest
    assert (paths[0] / "CB" / "val.jsonl").read_bytes() == b'{"b": 2}\n'
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [bundle.digest]  # no temp folders left
    (src / "CB" / "val.jsonl").write_bytes(b'{"b": 3}\n')
    assert Bundle.pack(src).digest != bundle.digest


def test_training_logs_the_contract(store, tiny_model_dir, data_dir, tmp_path):
    ctx = make_ctx(store, "full", tiny_model_dir, data_dir)
    rec = Recorder(tmp_path)
    final = run_training({"task": "cb", "seed": 0}, ctx, None, rec)
    mc = ctx.client()
    (run,) = tracking.search_study_runs(mc, ctx.experiment_id, "full")
    assert run.info.run_name == "cb-seed0" and run.info.status == "FINISHED"
    assert run.data.tags["ptray.kind"] == "train" and run.data.tags["ptray.task"] == "cb"
    assert run.data.tags["ptray.seed"] == "0" and run.data.tags["ptray.study"] == "full"
    # Per-epoch history at steps 1..N; final metrics under their own names.
    assert tracking.logged_epochs(mc, run.info.run_id) == [1, 2, 3]
    for key in ("train_loss", "exact_match", "rank_accuracy"):
        assert [m.step for m in mc.get_metric_history(run.info.run_id, key)] == [1, 2, 3]
    assert run.data.metrics["final_exact_match"] == pytest.approx(final["exact_match"])
    assert run.data.metrics["final_rank_accuracy"] == pytest.approx(final["rank_accuracy"])
    # Params are the resolved config: n tokens and init text as trained, not the unresolved None.
    p = run.data.params
    assert p["template_version"] == "1" and p["lr"] == "0.03" and p["batch_size"] == "8" and p["task"] == "cb"
    assert int(p["num_tokens"]) > 0 and p["init_text"] not in ("", "null")
    assert p["precision"] == "no" and p["device"] == "cpu" and p["code_version"].startswith("0.1.0")
    # Artifacts: exactly save_run's files; the prompt is the best epoch's prompt.
    names = sorted(a.path for a in mc.list_artifacts(run.info.run_id))
    assert names == ["config.json", "history.json", "metrics.json", "predictions.json", "prompt"]
    assert sorted(layout.TRAIN_FILES) == names
    down = Path(mc.download_artifacts(run.info.run_id, "", str(tmp_path / "down")))
    best = load_checkpoint(rec.checkpoints[-1])["best"]
    assert torch.allclose(load_adapter(down / "prompt"), best["prompt"])
    history = json.loads((down / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert json.loads((down / "config.json").read_text())["model"] == str(tiny_model_dir)
    # Tune got one report per epoch (with a checkpoint), then the final one.
    assert [m.get("epoch") for m in rec.metrics[:-1]] == [1, 2, 3] and len(rec.checkpoints) == 3


def test_resumed_trial_continues_its_run_without_gap_or_duplicate(store, tiny_model_dir, data_dir, tmp_path):
    reference = make_ctx(store, "ref", tiny_model_dir, data_dir)
    ref_rec = Recorder(tmp_path / "ref")
    run_training({"task": "copa", "seed": 1}, reference, None, ref_rec)

    ctx = make_ctx(store, "crash", tiny_model_dir, data_dir)
    dying = Recorder(tmp_path / "a", die_after_checkpoint_of_epoch=2)
    with pytest.raises(SystemExit):
        run_training({"task": "copa", "seed": 1}, ctx, None, dying)
    mc = ctx.client()
    (run,) = tracking.search_study_runs(mc, ctx.experiment_id, "crash")
    assert tracking.logged_epochs(mc, run.info.run_id) == [1]  # epoch 2 is checkpointed, not logged
    assert run.info.status == "FAILED"

    resumed = Recorder(tmp_path / "b")
    run_training({"task": "copa", "seed": 1}, ctx, load_checkpoint(dying.checkpoints[-1]), resumed)
    (after,) = tracking.search_study_runs(mc, ctx.experiment_id, "crash")
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"
    assert after.data.tags["ptray.resumed_after_epoch"] == "2"
    assert tracking.logged_epochs(mc, run.info.run_id) == [1, 2, 3]
    # Resuming from the checkpoint (prompt, optimizer, RNG, early stopping) gives the uninterrupted run's results.
    ref_run = tracking.search_study_runs(mc, ctx.experiment_id, "ref")[0]
    ours = [m.value for m in sorted(mc.get_metric_history(run.info.run_id, "eval_loss"), key=lambda m: m.step)]
    theirs = [m.value for m in sorted(mc.get_metric_history(ref_run.info.run_id, "eval_loss"), key=lambda m: m.step)]
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert torch.allclose(load_checkpoint(resumed.checkpoints[-1])["prompt"],
                          load_checkpoint(ref_rec.checkpoints[-1])["prompt"], atol=1e-6)


def test_finished_run_is_not_trained_again(store, tiny_model_dir, data_dir, tmp_path, monkeypatch):
    ctx = make_ctx(store, "again", tiny_model_dir, data_dir, max_epochs=1)
    first = run_training({"task": "wsc", "seed": 0}, ctx, None, Recorder(tmp_path / "a"))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished trial was trained again")

    monkeypatch.setattr("ptray.train.train", no_training)
    rec = Recorder(tmp_path / "b")
    again = run_training({"task": "wsc", "seed": 0}, ctx, None, rec)
    assert again["exact_match"] == pytest.approx(first["exact_match"])
    assert rec.metrics[-1]["done_before"] == 1
    assert len(tracking.search_study_runs(ctx.client(), ctx.experiment_id, "again")) == 1


def test_transfer_logs_one_run_per_evaluation_and_skips_finished_ones(store, tiny_model_dir, data_dir, tmp_path):
    ctx = make_ctx(store, "transfer", tiny_model_dir, data_dir, max_epochs=1)
    mc = ctx.client()
    sources = []
    for task, seed in (("cb", 0), ("rte", 1)):
        run_training({"task": task, "seed": seed}, ctx, None, Recorder(tmp_path / f"{task}{seed}"))
        run = tracking.find_run(mc, ctx.experiment_id, "transfer", layout.train_run_name(task, seed))
        sources.append({"task": task, "seed": seed, "run_id": run.info.run_id})

    summaries = transfer_target("rte", sources, ctx)
    assert [s["name"] for s in summaries] == ["baseline-none-on-rte", "transfer-cb-seed0-on-rte",
                                              "transfer-rte-seed1-on-rte"]
    runs = {r.info.run_name: r for r in tracking.search_study_runs(mc, ctx.experiment_id, "transfer")
            if r.data.tags["ptray.kind"] != "train"}
    assert sorted(runs) == sorted(s["name"] for s in summaries)
    base = runs["baseline-none-on-rte"]
    assert base.data.tags == {**base.data.tags, "ptray.kind": "baseline", "ptray.source": "none",
                              "ptray.target": "rte", "ptray.task": "rte"}
    t = runs["transfer-cb-seed0-on-rte"]
    assert t.data.tags["ptray.source"] == "cb" and t.data.tags["ptray.seed"] == "0"
    assert t.data.tags["ptray.target"] == "rte" and t.data.params["source_run_id"] == sources[0]["run_id"]
    down = Path(mc.download_artifacts(t.info.run_id, "", str(tmp_path / "t")))
    metrics = json.loads((down / "metrics.json").read_text())
    assert set(metrics) == {"source", "source_seed", "target", "exact_match", "rank_accuracy", "eval_loss",
                            "num_examples", "no_prompt_exact_match", "no_prompt_rank_accuracy",
                            "delta_exact_match", "delta_rank_accuracy"}
    assert (metrics["source"], metrics["source_seed"], metrics["target"]) == ("cb", 0, "rte")
    assert metrics["no_prompt_rank_accuracy"] == base.data.metrics["rank_accuracy"]
    delta = metrics["rank_accuracy"] - base.data.metrics["rank_accuracy"]
    assert metrics["delta_rank_accuracy"] == pytest.approx(delta)
    assert metrics["num_examples"] == 16
    preds = json.loads((down / "predictions.json").read_text())
    assert set(preds) == {"idx", "em_correct", "rank_correct", "rank_pred"}  # the train runs' schema, no baselines
    assert set(metrics) == set(layout.EVAL_METRIC_KEYS)
    assert len(preds["idx"]) == len(preds["rank_pred"]) == 16
    assert sum(preds["rank_correct"]) / 16 == pytest.approx(metrics["rank_accuracy"])
    base_metrics = json.loads(Path(mc.download_artifacts(base.info.run_id, "metrics.json", str(tmp_path / "b")))
                              .read_text())
    assert base_metrics["source"] == "none" and base_metrics["source_seed"] is None
    assert base_metrics["delta_exact_match"] == 0

    # A retry (or --resume) finds everything done: nothing is evaluated or logged again.
    assert transfer_target("rte", sources, ctx) == []
    assert len(tracking.search_study_runs(mc, ctx.experiment_id, "transfer")) == 2 + 3

    # An evaluation whose run crashed before FINISHED is redone, and its broken run deleted.
    mc.set_terminated(t.info.run_id, "FAILED")
    redone = transfer_target("rte", sources, ctx)
    assert [s["name"] for s in redone] == ["transfer-cb-seed0-on-rte"]
    names = [r.info.run_name for r in tracking.search_study_runs(mc, ctx.experiment_id, "transfer")]
    assert sorted(names).count("transfer-cb-seed0-on-rte") == 1 and len(names) == 5
