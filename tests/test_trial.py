"""The trial and transfer adapters without Ray: the training adapter (checkpoint -> MLflow order, resume into the
same run, no duplicate epochs, no retraining of a finished run), the transfer evaluations, and the bundles that
carry files to nodes."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from ptray import layout
from ptray.config import TrainConfig
from ptray.errors import PtrayError
from ptray.lm.prompt import load_adapter
from ptray.study import tracking
from ptray.study.bundle import Bundle
from ptray.study.checkpoints import load_checkpoint, load_trial_checkpoint, save_checkpoint, save_trial_checkpoint
from ptray.study.context import StudyContext
from ptray.study.store import client
from ptray.study.transfer import transfer_target
from ptray.study.trial import group_key, parse_group_key, run_group, run_training

EPOCHS = 3


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one costs seconds); each test uses its own study id."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlruns') / 'mlflow.db'}"
    mc = client(uri)
    return uri, tracking.get_or_create_experiment(mc, "ptray-test-trial")


def make_ctx(store, study, tiny_model_dir, data_dir, **train) -> StudyContext:
    uri, exp = store
    fields = dict(model=str(tiny_model_dir), data_dir=str(data_dir), max_epochs=EPOCHS, patience=10, batch_size=8,
                  max_train_examples=16, max_eval_examples=16, max_length=64, precision="no")
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
    assert "group_size" not in p and "group_index" not in p  # a single trial, no group's member
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


class FakeTune:
    """``ray.tune``'s checkpoint and report for a Tune function run outside Tune: a checkpoint to resume from, and
    each reported checkpoint copied (Tune's temporary folder is gone once report returns)."""

    def __init__(self, tmp: Path, resume_from: Path | None = None):
        self.tmp, self.resume_from = tmp, resume_from
        self.checkpoints: list[Path] = []
        self.metrics: list[dict] = []

    def get_checkpoint(self):
        from ray import tune

        return None if self.resume_from is None else tune.Checkpoint.from_directory(str(self.resume_from))

    def report(self, metrics, checkpoint=None):
        self.metrics.append(dict(metrics))
        if checkpoint is not None:
            self.checkpoints.append(Path(shutil.copytree(checkpoint.path, self.tmp / f"ckpt{len(self.checkpoints)}")))


def test_tune_resumes_a_single_trial_from_a_checkpoint_of_the_old_layout(store, tiny_model_dir, data_dir, tmp_path,
                                                                         monkeypatch):
    """A single trial is a group of one in Tune: one report, one checkpoint layout (a folder per prompt). A study
    started before that and resumed now continues from its trials' checkpoints of the old layout (the state at the
    top)."""
    from ray import tune

    from ptray.study.trial import train_trial

    ctx = make_ctx(store, "oldckpt", tiny_model_dir, data_dir)
    dying = Recorder(tmp_path / "a", die_after_checkpoint_of_epoch=2)
    with pytest.raises(SystemExit):
        run_training({"task": "copa", "seed": 1}, ctx, None, dying)
    old = dying.checkpoints[-1]  # save_checkpoint into the checkpoint itself: the old single-trial layout
    assert sorted(p.name for p in old.iterdir()) == ["run.json", "state.pt"]
    mc = ctx.client()
    (run,) = tracking.search_study_runs(mc, ctx.experiment_id, "oldckpt")

    fake = FakeTune(tmp_path / "tune", resume_from=old)
    monkeypatch.setattr(tune, "get_checkpoint", fake.get_checkpoint)
    monkeypatch.setattr(tune, "report", fake.report)
    train_trial({"task": "copa", "seed": 1}, ctx)
    (after,) = tracking.search_study_runs(mc, ctx.experiment_id, "oldckpt")
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"
    assert after.data.tags["ptray.resumed_after_epoch"] == "2"
    assert tracking.logged_epochs(mc, run.info.run_id) == [1, 2, 3]
    assert "group_size" not in after.data.params  # logged as a single trial, not as a group's member
    # Epoch 3 only, checkpointed in the one layout: the prompt's folder, named by its run name.
    assert [m.get("epoch") for m in fake.metrics] == [3, None] and fake.metrics[-1]["prompts"] == 1
    assert fake.metrics[-1]["exact_match"] == pytest.approx(after.data.metrics["final_exact_match"])
    (ckpt,) = fake.checkpoints
    assert sorted(p.name for p in ckpt.iterdir()) == ["copa-seed1"]
    assert load_trial_checkpoint(ckpt, ["copa-seed1"])["copa-seed1"]["epoch"] == 3
    with pytest.raises(PtrayError, match="single trial's checkpoint"):
        load_trial_checkpoint(old, ["copa-seed1", "cb-seed0"])


def test_finished_run_is_not_trained_again(store, tiny_model_dir, data_dir, tmp_path, monkeypatch):
    ctx = make_ctx(store, "again", tiny_model_dir, data_dir, max_epochs=1)
    first = run_training({"task": "wsc", "seed": 0}, ctx, None, Recorder(tmp_path / "a"))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished trial was trained again")

    monkeypatch.setattr("ptray.training.train.train", no_training)
    monkeypatch.setattr("ptray.training.loop.train_group", no_training)  # what a trial trains with, one or a group
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
    # The prompts were scored together (evaluate_prompts); each equals its own evaluation of the downloaded prompt.
    from ptray.lm.evaluate import evaluate_on_task
    from ptray.lm.load import load_model

    model, tok = load_model(str(tiny_model_dir))
    alone, idx = evaluate_on_task(model, tok, "rte", load_adapter(mc.download_artifacts(
        sources[0]["run_id"], "prompt", str(tmp_path / "src"))), data_dir=str(data_dir), max_examples=16,
        max_length=64, batch_size=8)
    assert metrics["eval_loss"] == pytest.approx(alone.loss, rel=1e-5) and preds["idx"] == idx
    assert preds["em_correct"] == alone.em_correct and preds["rank_pred"] == alone.rank_pred
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


# ---------------------------------------------------------------------------------------------------------------
# trial groups: several prompts per Tune trial, each still its own MLflow run


class OneEpochForSeed0(StudyContext):
    """Prompts of seed 0 train one epoch, the others EPOCHS: a group member that leaves while the group goes on."""

    def train_config(self, task, seed):
        cfg = super().train_config(task, seed)
        return dataclasses.replace(cfg, max_epochs=1) if seed == 0 else cfg


class GroupRecorder:
    """tune.report for a group: each group checkpoint kept as Tune persists it; the run statuses seen then."""

    def __init__(self, tmp: Path, client, die_at: tuple[str, int] | None = None):
        self.tmp, self.client, self.die = tmp, client, die_at
        self.checkpoints: list[Path] = []
        self.metrics: list[dict] = []
        self.statuses: list[dict] = []

    def __call__(self, metrics, states):
        self.metrics.append(dict(metrics))
        if states is not None:
            folder = self.tmp / f"ckpt{len(self.checkpoints)}"
            save_trial_checkpoint(folder, states)
            self.checkpoints.append(folder)
            self.statuses.append({n: self.client.get_run(r).info.status for n, (_, r) in states.items()})
            if (metrics.get("prompt"), metrics.get("epoch")) == self.die:
                raise SystemExit("node lost")  # after the checkpoint, before the epoch reaches MLflow


def contract_tags(run) -> dict:
    """A train run's ptray tags but those naming its study, node or resume."""
    where = {"ptray.study", "ptray.node", "ptray.ray_node_id", "ptray.resumed_after_epoch"}
    return {k: v for k, v in run.data.tags.items() if k.startswith("ptray.") and k not in where}


def make_group_ctx(store, study, tiny_model_dir, data_dir) -> StudyContext:
    ctx = make_ctx(store, study, tiny_model_dir, data_dir)
    return OneEpochForSeed0(**{f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx)})


def test_group_trial_logs_each_prompt_as_a_single_trial_and_resumes(store, tiny_model_dir, data_dir, tmp_path):
    assert parse_group_key(group_key([("cb", 0), ("copa", 1)])) == [("cb", 0), ("copa", 1)]
    ref = make_group_ctx(store, "gref", tiny_model_dir, data_dir)
    for task, seed in (("cb", 0), ("copa", 1)):
        run_training({"task": task, "seed": seed}, ref, None, Recorder(tmp_path / f"ref{task}"))
    mc = ref.client()
    refs = {r.info.run_name: r for r in tracking.search_study_runs(mc, ref.experiment_id, "gref")}

    ctx = make_group_ctx(store, "grp", tiny_model_dir, data_dir)
    config = {"group": group_key([("cb", 0), ("copa", 1)])}
    dying = GroupRecorder(tmp_path / "a", mc, die_at=("copa-seed1", 2))
    with pytest.raises(SystemExit):
        run_group(config, ctx, None, dying)
    runs = {r.info.run_name: r for r in tracking.search_study_runs(mc, ctx.experiment_id, "grp")}
    assert sorted(runs) == ["cb-seed0", "copa-seed1"]
    # cb-seed0 left the group after its one epoch and its run was finished while copa-seed1 went on.
    assert runs["cb-seed0"].info.status == "FINISHED" and runs["copa-seed1"].info.status == "FAILED"
    assert dying.statuses[-1] == {"copa-seed1": "RUNNING"}  # the finished prompt is no longer checkpointed
    assert tracking.logged_epochs(mc, runs["copa-seed1"].info.run_id) == [1]  # epoch 2: checkpointed, not logged
    last = load_trial_checkpoint(dying.checkpoints[-1], ["cb-seed0", "copa-seed1"])
    assert sorted(last) == ["copa-seed1"] and last["copa-seed1"]["epoch"] == 2
    assert last["copa-seed1"]["run_id"] == runs["copa-seed1"].info.run_id

    resumed = GroupRecorder(tmp_path / "b", mc)
    finals = run_group(config, ctx, last, resumed)
    assert sorted(finals) == ["cb-seed0", "copa-seed1"]
    assert {m.get("prompt") for m in resumed.metrics if "epoch" in m} == {"copa-seed1"}  # cb was not trained again
    after = {r.info.run_name: r for r in tracking.search_study_runs(mc, ctx.experiment_id, "grp")}
    assert len(after) == 2 and after["copa-seed1"].info.run_id == runs["copa-seed1"].info.run_id
    assert after["cb-seed0"].info.end_time == runs["cb-seed0"].info.end_time
    assert after["copa-seed1"].data.tags["ptray.resumed_after_epoch"] == "2"
    for name, epochs in (("cb-seed0", [1]), ("copa-seed1", [1, 2, 3])):
        run, single = after[name], refs[name]
        assert run.info.status == "FINISHED" and tracking.logged_epochs(mc, run.info.run_id) == epochs
        assert contract_tags(run) == contract_tags(single)  # kind, task, seed: the same tags as a single trial
        # The group's numbers are the single trial's, to fp32 rounding (rows are padded to other widths).
        for key in ("eval_loss", "train_loss"):
            ours = [m.value for m in sorted(mc.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
            theirs = [m.value for m in sorted(mc.get_metric_history(single.info.run_id, key), key=lambda m: m.step)]
            assert ours == pytest.approx(theirs, rel=1e-4), (name, key)
        assert set(single.data.metrics) <= set(run.data.metrics)
        for key in ("final_eval_loss", "final_rank_accuracy", "final_best_epoch", "final_no_prompt_eval_loss"):
            assert run.data.metrics[key] == pytest.approx(single.data.metrics[key], rel=1e-4)
        assert set(single.data.params) <= set(run.data.params)
        assert run.data.params["group_size"] == "2"
        assert sorted(a.path for a in mc.list_artifacts(run.info.run_id)) == sorted(layout.TRAIN_FILES)
        ours = load_adapter(mc.download_artifacts(run.info.run_id, "prompt", str(tmp_path / run.info.run_id)))
        theirs = load_adapter(mc.download_artifacts(single.info.run_id, "prompt", str(tmp_path / single.info.run_id)))
        assert torch.allclose(ours, theirs, atol=1e-4)
    assert after["cb-seed0"].data.params["group_index"] == "0"
    assert after["copa-seed1"].data.params["group_index"] == "1"

    # The group restarted once more (e.g. Tune retried after the last report): nothing is trained or logged again.
    again = GroupRecorder(tmp_path / "c", mc)
    run_group(config, ctx, None, again)
    assert again.metrics == [{"prompts": 2, "done_before": 1}]
    assert len(tracking.search_study_runs(mc, ctx.experiment_id, "grp")) == 2
