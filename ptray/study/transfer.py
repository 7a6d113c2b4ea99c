"""The transfer grid: every trained prompt, and no prompt, evaluated on every target's validation split: the
study's tasks, then its transfer-only targets (``Plan.targets``: tasks with a validation split that are not trained;
their runs are laid out as any target's, so a target without train runs in the study is a held-out one).

``transfer_phase`` fans out one Ray task per target task (the model and the target's data load once for all the
prompts, which are evaluated together, many per forward: ``ptray.lm.evaluate.evaluate_prompts``); ``transfer_target``
is that task, without Ray, so tests call it directly. Each evaluation is one MLflow
run laid out as ``ptray.layout`` says; evaluations already FINISHED are skipped, so a retried task (or
``--resume``) redoes only what is missing.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ptray import layout
from ptray.files import write_json
from ptray.plan import Options, Plan
from ptray.study import tracking
from ptray.study.context import StudyContext, quiet, torch_threads

log = logging.getLogger("ptray")


def transfer_phase(plan: Plan, opts: Options, ctx: StudyContext, gpus: float) -> list[str]:
    """Evaluate every finished prompt of the study on every task, plus no prompt: one Ray task per target.

    ``gpus``: the GPU fraction of each task (with ``opts.cpus_per_trial`` CPUs). Returns one message per failed
    target (the other targets' runs are kept).
    """
    import ray

    mc = ctx.client()
    done = {r.info.run_name: r.info.run_id for r in tracking.search_study_runs(mc, ctx.experiment_id, ctx.study,
                                                                               kind=layout.TRAIN)
            if r.info.status == layout.FINISHED}
    # every finished prompt, of every condition (a member is (task, seed) or (task, seed, condition))
    sources = [{"task": m[0], "seed": m[1], "condition": m[2] if len(m) > 2 else None,
                "run_id": done[layout.train_run_name(*m)]} for m in plan.trials if layout.train_run_name(*m) in done]
    targets = plan.transfer_targets  # the trained tasks, then the transfer-only targets
    held = f" (transfer only: {', '.join(plan.targets)})" if plan.targets else ""
    print(f"\ntransfer: {len(sources)} prompts x {len(targets)} tasks{held} + {len(targets)} no-prompt baselines, "
          f"one Ray task per target", flush=True)
    task = ray.remote(transfer_target).options(num_cpus=opts.cpus_per_trial, num_gpus=gpus, max_retries=3)
    ctx_ref = ray.put(ctx)
    pending = {task.remote(target, sources, ctx_ref): (target, time.perf_counter()) for target in targets}
    failures = []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        target, started = pending.pop(ready[0])
        try:
            runs = ray.get(ready[0])
            print(f"transfer on {target}: {len(runs)} new runs ({time.perf_counter() - started:.1f} s)", flush=True)
        except Exception as err:  # a failed target must not hide the others' results
            message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            failures.append(f"{target}: {message}")
            print(f"transfer on {target} failed: {message}", file=sys.stderr, flush=True)
    return failures


def transfer_target(target: str, sources: list[dict[str, Any]], ctx: StudyContext) -> list[dict[str, Any]]:
    """Evaluate each source prompt and no prompt on ``target``'s validation split, one MLflow run per evaluation.

    ``sources``: ``{"task", "seed", "run_id"}`` of finished train runs. The model and data load once for all of
    them, and every prompt still to evaluate (and no prompt) is scored in the same passes (``evaluate_prompts``,
    equal to one evaluation per prompt). Evaluations already FINISHED in MLflow are skipped. Returns one summary
    dict per new evaluation run (``run_id``, ``name``, ``kind`` and its ``metrics.json``), the baseline first. It
    runs on ``ctx.threads`` torch CPU threads, as the trials do.
    """
    with torch_threads(ctx.threads):
        return _transfer_target(target, sources, ctx)


def _transfer_target(target: str, sources: list[dict[str, Any]], ctx: StudyContext) -> list[dict[str, Any]]:
    import torch
    from mlflow.artifacts import download_artifacts

    from ptray.config import resolve_attention
    from ptray.data.batching import encode_all
    from ptray.data.superglue import load_split
    from ptray.data.tasks import get_task
    from ptray.data.tokens import pad_token_id
    from ptray.lm.attention import attention_implementation
    from ptray.lm.evaluate import evaluate_prompts
    from ptray.lm.load import resolve_device_precision, setup_model
    from ptray.lm.prompt import load_adapter
    from ptray.versions import code_version, compute_settings, library_versions

    quiet()
    ctx.register_tasks()  # the study's user tasks (a target may be one), before any task is looked up
    t0 = time.perf_counter()
    client = ctx.client()
    cfg = ctx.eval_config()
    device, precision = resolve_device_precision(cfg.device, cfg.precision)
    attention = resolve_attention(cfg.attention, device)
    base_params = {
        **ctx.params, "model": ctx.model_label, "data_dir": ctx.data_label, "target": target,
        "template_version": get_task(target).version, "eval_split": cfg.split, "max_eval_examples": cfg.max_examples,
        "max_length": cfg.max_length, "device": device, "precision": precision, "attention": attention,
        "code_version": code_version(),
        **library_versions(),  # torch_version, transformers_version, peft_version, accelerate_version
        **compute_settings(),  # torch threads, BLAS, oneDNN, CPU capability: what else changes the numbers
    }
    baseline_run = tracking.replace_unfinished(client, ctx.experiment_id, ctx.study, layout.baseline_run_name(target))
    todo = []
    for src in sources:
        run_name = layout.transfer_run_name(src["task"], src["seed"], target, src.get("condition"))
        if tracking.replace_unfinished(client, ctx.experiment_id, ctx.study, run_name) is None:
            todo.append(src)
    if baseline_run is not None and not todo:
        return []

    model, tokenizer, accelerator = setup_model(cfg.model, device, precision, cfg.compile, attention)
    base_params["attention_implementation"] = attention_implementation(model)  # what ran (Gemma 2: eager)
    task = get_task(target)
    data = encode_all(task, load_split(task, cfg.split, cfg.data_dir, cfg.hub_dataset, cfg.max_examples), tokenizer,
                      cfg.max_length)
    idx = [d.idx for d in data if d.label is not None]
    with tempfile.TemporaryDirectory(prefix="ptray-prompts-") as tmp:
        prompts = [load_adapter(download_artifacts(run_id=src["run_id"], artifact_path=layout.PROMPT_DIR,
                                                   dst_path=str(Path(tmp) / src["run_id"]),
                                                   tracking_uri=ctx.tracking_uri)) for src in todo]
    with torch.no_grad():
        results = evaluate_prompts(model, data, ([None] if baseline_run is None else []) + prompts, cfg.batch_size,
                                   pad_token_id(tokenizer), tokenizer.eos_token_id, autocast=accelerator.autocast)

    summaries = []
    if baseline_run is None:
        base = results.pop(0)
        no_prompt = {"exact_match": base.exact_match, "rank_accuracy": base.rank_accuracy}
        summaries.append(log_evaluation(client, ctx, None, None, target, base, idx, no_prompt,
                                        {**base_params, "source": layout.NO_SOURCE}))
    else:
        no_prompt = {k: baseline_run.data.metrics[k] for k in ("exact_match", "rank_accuracy")}
    for src, prompt, res in zip(todo, prompts, results):
        params = {**base_params, "source": src["task"], "source_seed": src["seed"],
                  "source_run_id": src["run_id"], "num_tokens": int(prompt.shape[0])}
        if src.get("condition"):
            params["source_condition"] = src["condition"]
        summaries.append(log_evaluation(client, ctx, src["task"], src["seed"], target, res, idx, no_prompt, params,
                                        src.get("condition")))
    log.info("transfer on %s: %d runs in %.1f s", target, len(summaries), time.perf_counter() - t0)
    return summaries


def log_evaluation(client, ctx: StudyContext, source: str | None, seed: int | None, target: str, res,
                   idx: list[int], no_prompt: dict[str, float], params: dict[str, Any],
                   condition: str | None = None) -> dict[str, Any]:
    """One transfer run (``source`` given) or baseline run (``source`` None): tags, params, metrics,
    ``metrics.json`` and ``predictions.json``, then FINISHED (FAILED, and raised again, on an error).

    ``res`` is the ``EvalResult`` on ``target`` and ``idx`` its examples' ids; ``no_prompt`` the target's no-prompt
    ``exact_match`` and ``rank_accuracy``. Returns ``{"run_id", "name", "kind", **metrics.json}``.
    """
    kind, name, tags = layout.eval_run(ctx.study, source, seed, target, condition)
    metrics = layout.eval_metrics(source, seed, target, res, no_prompt)
    run_id = tracking.create_run(client, ctx.experiment_id, name, tags).info.run_id
    with tempfile.TemporaryDirectory(prefix="ptray-eval-") as tmp:
        try:
            write_json(Path(tmp) / layout.METRICS_FILE, metrics)
            write_json(Path(tmp) / layout.PREDICTIONS_FILE, layout.predictions(idx, res))
        except BaseException:
            tracking.mark_failed(client, run_id)
            raise
        # FINISHED, or FAILED and raised again on an error (the retry redoes it); the writer ptray publish uses too
        tracking.log_finished_run(client, run_id, params, layout.logged_metrics(kind, metrics), tmp)
    return {"run_id": run_id, "name": name, "kind": kind, **metrics}
