"""Ray adapters around the core: one Tune trial trains one (task, seed) prompt; one Ray task evaluates every prompt
on one target task. Both log to MLflow as docs/tracking.md describes and are safe to run again.

``train_trial`` is the thin Tune function (config dict -> ``TrainConfig`` -> ``train`` -> ``tune.report``);
``run_training`` holds the logic without Ray, so tests drive it with a fake ``report``. The ``StudyContext`` with
everything a trial needs (tracking store, shared config, the smoke model's and the data's files) reaches the
workers once through ``tune.with_parameters`` / the object store, so no node needs a shared disk.

Order of writes, which is what keeps a resumed run's history contiguous: each epoch's checkpoint is persisted
(``tune.report``) before the epoch is logged to MLflow; a resumed trial logs what its checkpoint holds and MLflow
lacks (``tracking.sync_history``), then continues with the next epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptray import tracking

log = logging.getLogger("ptray")

STATE_FILE = "state.pt"
RUN_FILE = "run.json"

# Config fields that ``train`` resolves (None -> the init text's length, auto -> cuda/bf16, ...): logged only once
# resolved, since MLflow never changes a param after it is set.
RESOLVED_LATER = ("init_text", "num_tokens", "device", "precision")


def cache_dir() -> Path:
    """This node's ptray cache: $PTRAY_CACHE, else $XDG_CACHE_HOME/ptray, else ~/.cache/ptray."""
    if os.environ.get("PTRAY_CACHE"):
        return Path(os.environ["PTRAY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ptray"


def quiet() -> None:
    """No download/loading progress bars in workers: with many trials they bury Tune's progress table."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a core dependency
        pass


@dataclass(frozen=True)
class Bundle:
    """A small folder (the smoke model, the SuperGLUE files) carried to every node as bytes, written once per node."""

    files: dict[str, bytes]
    digest: str

    @classmethod
    def pack(cls, root: str | Path, relpaths: list[str] | None = None) -> Bundle:
        root = Path(root)
        if relpaths is None:
            relpaths = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        files = {rel: (root / rel).read_bytes() for rel in relpaths}
        sha = hashlib.sha256()
        for rel in sorted(files):
            sha.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
        return cls(files, sha.hexdigest()[:16])

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.files.values())

    def materialize(self, base: str | Path | None = None) -> Path:
        """Write the files under a node-local folder named by their digest; concurrent trials share one copy."""
        base = Path(base or cache_dir())
        out = base / self.digest
        if (out / ".complete").is_file():
            return out
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.digest}-", dir=base))
        for rel, data in self.files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        (tmp / ".complete").touch()
        try:
            os.rename(tmp, out)
        except OSError:  # another trial on this node won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
        return out


@dataclass(frozen=True)
class StudyContext:
    """What every trial and evaluation of one study shares. Shipped to workers once (``tune.with_parameters``)."""

    study: str
    experiment_id: str
    tracking_uri: str
    train: dict[str, Any]  # TrainConfig fields shared by every trial (no task, no seed)
    model_label: str  # the model as the user named it (logged; the smoke model's files travel in model_bundle)
    data_label: str | None  # the data folder as the user named it, None for the Hub
    model_bundle: Bundle | None = None
    data_bundle: Bundle | None = None
    transfer_batch_size: int = 32
    params: dict[str, Any] = field(default_factory=dict)  # study-level params logged with every run

    def train_config(self, task: str, seed: int):
        """The ``TrainConfig`` of one trial, with the bundles written to this node."""
        from ptray.train import TrainConfig

        fields = dict(self.train)
        if self.model_bundle is not None:
            fields["model"] = str(self.model_bundle.materialize())
        if self.data_bundle is not None:
            fields["data_dir"] = str(self.data_bundle.materialize())
        return TrainConfig(task=task, seed=seed, **fields)

    def client(self):
        return tracking.client(self.tracking_uri)

    def logged_config(self, resolved: dict[str, Any]) -> dict[str, Any]:
        """A resolved config as logged: the model and data as the user named them, not a node's cache folder."""
        out = dict(resolved)
        out["model"] = self.model_label
        out["data_dir"] = self.data_label
        if self.data_bundle is not None:
            out["data_digest"] = self.data_bundle.digest
        if self.model_bundle is not None:
            out["model_digest"] = self.model_bundle.digest
        return {**self.params, **out}


# ---------------------------------------------------------------------------------------------------------------
# training


def save_checkpoint(folder: str | Path, state: dict[str, Any], run_id: str) -> None:
    import torch

    folder = Path(folder)
    torch.save(state, folder / STATE_FILE)
    tracking.write_json(folder / RUN_FILE, {"run_id": run_id, "epoch": state["epoch"]})


def load_checkpoint(folder: str | Path) -> dict[str, Any]:
    """The state saved by ``save_checkpoint`` plus ``run_id``; tensors and plain values only (weights_only)."""
    import torch

    folder = Path(folder)
    state = torch.load(folder / STATE_FILE, weights_only=True, map_location="cpu")
    state["run_id"] = json.loads((folder / RUN_FILE).read_text())["run_id"]
    return state


# report(metrics, state, run_id): persist a checkpoint of ``state`` (None: none) and hand ``metrics`` to Tune.
Report = Callable[[dict[str, Any], "dict[str, Any] | None", str], None]


def train_trial(config: dict[str, Any], ctx: StudyContext) -> None:
    """Tune function: train ``config['task']`` with ``config['seed']``, resuming from Tune's checkpoint if any."""
    from ray import tune

    quiet()
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = load_checkpoint(folder)
    run_training(config, ctx, resume, _tune_report)


def _tune_report(metrics: dict[str, Any], state: dict[str, Any] | None, run_id: str) -> None:
    from ray import tune

    if state is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="ptray-ckpt-") as folder:
        save_checkpoint(folder, state, run_id)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))  # persisted before it returns


def run_training(config: dict[str, Any], ctx: StudyContext, resume: dict[str, Any] | None,
                 report: Report) -> dict[str, Any]:
    """Train one prompt into its MLflow run (found again, never duplicated); return the final metrics.

    ``resume`` is a checkpoint's state (``load_checkpoint``). A run that is already FINISHED (the trial completed but
    Tune never heard of it, e.g. the driver was killed) is reported again without training.
    """
    from ptray.train import save_run, train

    task, seed = config["task"], int(config["seed"])
    cfg = ctx.train_config(task, seed)
    client = ctx.client()
    name = tracking.train_run_name(task, seed)
    run = _train_run(client, ctx, name, task, seed, resume)
    if run.info.status == tracking.FINISHED:
        final = tracking.final_metrics(run)
        log.info("%s already finished in MLflow run %s; not training again", name, run.info.run_id)
        report({**final, "done_before": 1}, None, run.info.run_id)
        return final

    history = list(resume["history"]) if resume else []
    run_id = tracking.sync_history(client, run, history)
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "ptray.node", socket.gethostname())
    if _ray_node_id():
        client.set_tag(run_id, "ptray.ray_node_id", _ray_node_id())
    if resume:
        client.set_tag(run_id, "ptray.resumed_after_epoch", str(resume["epoch"]))
    known = {k: v for k, v in cfg.to_dict().items() if k not in RESOLVED_LATER}
    tracking.log_params_once(client, run_id, ctx.logged_config(known))

    def on_epoch_end(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        report(metrics, state, run_id)  # the checkpoint first: see the module docstring
        tracking.log_metrics(client, run_id, tracking.epoch_metrics(metrics), step=metrics["epoch"])

    try:
        result = train(cfg, on_epoch_end=on_epoch_end, resume=_train_state(resume))
        # Resolved values (n tokens, init text, device, precision, code version) are known only now.
        tracking.log_params_once(client, run_id, ctx.logged_config(result.resolved))
        tracking.log_metrics(client, run_id, {tracking.FINAL_PREFIX + k: v for k, v in result.metrics.items()
                                              if k not in ("task", "seed")})
        with tempfile.TemporaryDirectory(prefix="ptray-run-") as tmp:
            out = save_run(result, Path(tmp) / "run")
            tracking.write_json(out / "config.json", ctx.logged_config(result.resolved))
            client.log_artifacts(run_id, str(out))
    except BaseException:
        _mark_failed(client, run_id)
        raise
    client.set_terminated(run_id, status=tracking.FINISHED)
    final = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and k != "seed"}
    report(final, None, run_id)
    return final


def _mark_failed(client, run_id: str) -> None:
    """FAILED, if the store still answers: the error that got us here is the one to report, not this one."""
    try:
        client.set_terminated(run_id, status="FAILED")
    except Exception as err:  # noqa: BLE001 - any store error; the original exception follows
        log.warning("could not mark MLflow run %s FAILED: %s", run_id, err)


def _ray_node_id() -> str:
    """The Ray node this process runs on ("" outside Ray): which node a run was last on, for people and tests."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except ImportError:
        return ""


def _train_run(client, ctx: StudyContext, name: str, task: str, seed: int, resume: dict[str, Any] | None):
    """The trial's MLflow run: the checkpoint's, else the one of that name in the study, else a new one."""
    if resume and resume.get("run_id"):
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(resume["run_id"])
        except MlflowException:  # deleted for good, or another store: fall back to the name
            run = None
        if run is not None and run.info.lifecycle_stage == "active":
            return run
    run = tracking.find_run(client, ctx.experiment_id, ctx.study, name)
    if run is None:
        run = tracking.create_run(client, ctx.experiment_id, name, tracking.run_tags(ctx.study, "train", task, seed))
    return run


def _train_state(resume: dict[str, Any] | None) -> dict[str, Any] | None:
    if resume is None:
        return None
    return {k: v for k, v in resume.items() if k != "run_id"}


# ---------------------------------------------------------------------------------------------------------------
# transfer


def transfer_target(target: str, sources: list[dict[str, Any]], ctx: StudyContext) -> list[dict[str, Any]]:
    """Evaluate each source prompt and no prompt on ``target``'s validation split, one MLflow run per evaluation.

    ``sources``: ``{"task", "seed", "run_id"}`` of finished train runs. The model and data load once for all of
    them. Evaluations already FINISHED in MLflow are skipped, so a retried task (or ``--resume``) redoes only what
    is missing. Returns one summary dict per evaluation run, the baseline first.
    """
    import torch
    from accelerate import Accelerator
    from mlflow.artifacts import download_artifacts

    from ptray.evaluate import evaluate_on_task
    from ptray.model import load_model, model_dtype, resolve_device_precision
    from ptray.prompt import load_adapter
    from ptray.tasks import get_task
    from ptray.train import code_version, compile_blocks

    quiet()
    t0 = time.perf_counter()
    client = ctx.client()
    cfg = ctx.train_config(target, 0)
    device, precision = resolve_device_precision(cfg.device, cfg.precision)
    base_params = {
        **ctx.params, "model": ctx.model_label, "data_dir": ctx.data_label, "target": target,
        "template_version": get_task(target).version, "eval_split": "val", "max_eval_examples": cfg.max_eval_examples,
        "max_length": cfg.max_length, "device": device, "precision": precision, "code_version": code_version(),
    }
    name = tracking.baseline_run_name(target)
    baseline_run = tracking.replace_unfinished(client, ctx.experiment_id, ctx.study, name)
    todo = []
    for src in sources:
        run_name = tracking.transfer_run_name(src["task"], src["seed"], target)
        if tracking.replace_unfinished(client, ctx.experiment_id, ctx.study, run_name) is None:
            todo.append(src)
    if baseline_run is not None and not todo:
        return []

    accelerator = Accelerator(mixed_precision=precision, cpu=device == "cpu")
    model, tokenizer = load_model(cfg.model, dtype=model_dtype(precision))
    model.to(accelerator.device)
    if cfg.compile:
        compile_blocks(model)

    def run_eval(prompt):
        return evaluate_on_task(model, tokenizer, target, prompt, data_dir=cfg.data_dir, split="val",
                                max_examples=cfg.max_eval_examples, max_length=cfg.max_length,
                                batch_size=ctx.transfer_batch_size, autocast=accelerator.autocast)

    summaries = []
    if baseline_run is None:
        base, idx = run_eval(None)
        no_prompt = {"exact_match": base.exact_match, "rank_accuracy": base.rank_accuracy}
        summaries.append(_log_evaluation(client, ctx, "baseline", None, None, target, base, idx, no_prompt,
                                         {**base_params, "source": "none"}))
    else:
        no_prompt = {k: baseline_run.data.metrics[k] for k in ("exact_match", "rank_accuracy")}
    with tempfile.TemporaryDirectory(prefix="ptray-prompts-") as tmp:
        for src in todo:
            folder = download_artifacts(run_id=src["run_id"], artifact_path="prompt",
                                        dst_path=str(Path(tmp) / src["run_id"]), tracking_uri=ctx.tracking_uri)
            prompt = load_adapter(folder)
            with torch.no_grad():
                res, idx = run_eval(prompt)
            params = {**base_params, "source": src["task"], "source_seed": src["seed"],
                      "source_run_id": src["run_id"], "num_tokens": int(prompt.shape[0])}
            summaries.append(_log_evaluation(client, ctx, "transfer", src["task"], src["seed"], target, res, idx,
                                             no_prompt, params))
    log.info("transfer on %s: %d runs in %.1f s", target, len(summaries), time.perf_counter() - t0)
    return summaries


def _log_evaluation(client, ctx: StudyContext, kind: str, source: str | None, seed: int | None, target: str, res,
                    idx: list[int], no_prompt: dict[str, float], params: dict[str, Any]) -> dict[str, Any]:
    """One transfer or baseline run: tags, params, metrics, metrics.json and predictions.json, then FINISHED."""
    if kind == "baseline":
        name, tags = tracking.baseline_run_name(target), tracking.run_tags(ctx.study, "baseline", target=target)
    else:
        name = tracking.transfer_run_name(source, seed, target)
        tags = tracking.run_tags(ctx.study, "transfer", seed=seed, source=source, target=target)
    metrics = {
        "source": source if kind == "transfer" else "none",
        "source_seed": seed,
        "target": target,
        "exact_match": res.exact_match,
        "rank_accuracy": res.rank_accuracy,
        "eval_loss": res.loss,
        "num_examples": res.num_examples,
        "no_prompt_exact_match": no_prompt["exact_match"],
        "no_prompt_rank_accuracy": no_prompt["rank_accuracy"],
        "delta_exact_match": res.exact_match - no_prompt["exact_match"],
        "delta_rank_accuracy": res.rank_accuracy - no_prompt["rank_accuracy"],
    }
    run = tracking.create_run(client, ctx.experiment_id, name, tags)
    run_id = run.info.run_id
    try:
        tracking.log_params_once(client, run_id, params)
        tracking.log_metrics(client, run_id, {k: v for k, v in metrics.items() if k != "source_seed"})
        with tempfile.TemporaryDirectory(prefix="ptray-eval-") as tmp:
            tracking.write_json(Path(tmp) / "metrics.json", metrics)
            tracking.write_json(Path(tmp) / "predictions.json", {
                "idx": idx, "em_correct": res.em_correct, "rank_correct": res.rank_correct,
                "rank_pred": res.rank_pred})
            client.log_artifacts(run_id, tmp)
    except BaseException:
        _mark_failed(client, run_id)
        raise
    client.set_terminated(run_id, status=tracking.FINISHED)
    return {"run_id": run_id, "name": name, "kind": kind, **metrics}

