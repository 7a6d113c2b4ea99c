"""Trial groups timed through ``ptray.training.loop.train_group``, the loop the study runs, for ``gpu.py``.

``group(ctx)`` (``res["group"]``): one trial (eager as ``ptray.train`` runs on CPU, and both fused paths) and
groups of K prompts (the study's tasks and seeds, task-major so that K=4 mixes the four tasks), each trained by
``train_group`` for two epochs of ``--group-steps`` steps each (every prompt keeps that many batches of 8, so all
epochs end on the same step; the validation set is cut to one example). Epoch 1 is the warm-up; epoch 2 is timed
by the loop itself (its ``train_tokens_per_s``, measured before the epoch's evaluation): tokens/s, MFU, peak memory.

``study_epochs(ctx)`` (``res["study_epochs"]``): the paper study (CB, RTE, COPA, WSC x seeds 0-3: 16 prompts in one
group) for exactly ``--study-epochs`` epochs with early stopping off (unless the time budget cuts it: reported),
then the 68 transfer evaluations: the cost of an epoch, measured. ``study(ctx)`` (``res["study"]``): the whole
study (up to 50 epochs, patience 5, the 68 evaluations) under ``--study-seconds`` and the time budget; when the
cap stops it, the epochs each prompt ran are reported and the evaluations run on the best prompts so far.
"""

from __future__ import annotations

import time

import torch

from benchmarks.context import Context, log
from benchmarks.fused_attention import error_line, set_attention
from benchmarks.measure import PeakMemory, sync
from ptray.config import TrainConfig
from ptray.lm.evaluate import evaluate_prompts
from ptray.training.loop import train_group

TASKS = ("cb", "rte", "copa", "wsc")
SEEDS = (0, 1, 2, 3)
EVALUATIONS = len(TASKS) * (len(TASKS) * len(SEEDS) + 1)  # every prompt on every task, and no prompt on each: 68


def members(k: int) -> list[tuple[str, int]]:
    """The first ``k`` (task, seed) prompts of the study, task-major over seeds."""
    return [(t, s) for s in SEEDS for t in TASKS][:k]


def configs(ctx: Context, prompts, **kw) -> list[TrainConfig]:
    """The TrainConfigs of ``prompts`` on this run's model, data and precision (``kw`` overrides)."""
    a = ctx.a
    base = dict(model="random-" + a.model_shape, data_dir=a.data_dir, device=ctx.dev, precision=a.precision,
                eval_batch_size=a.eval_batch_size, baselines=False, max_length=a.max_length,
                max_train_examples=a.max_train_examples, max_eval_examples=a.max_eval_examples)
    return [TrainConfig(task=t, seed=s, **{**base, **kw}) for t, s in prompts]


def epoch_counts(ctx: Context, task: str, n: int | None = None) -> tuple[int, float]:
    """(real tokens, training FLOPs) of one epoch over ``task``'s first ``n`` training examples."""
    data = ctx.data[task][:n]
    n_prompt = int(ctx.init[task].shape[0])
    tokens = [len(d.source) + len(d.answers[d.label]) for d in data]
    flops = sum(ctx.shape.train_flops(n_prompt + t, len(d.answers[d.label]) + 1) for t, d in zip(tokens, data))
    return sum(tokens), flops


def run_group(ctx: Context, cfgs, attention: str, on_epoch_end=None):
    """``train_group(cfgs)`` on the run's model with ``attention`` (eager, fused or folded); eager afterwards."""
    set_attention(ctx.model, "eager")
    try:
        return train_group(cfgs, on_epoch_end=on_epoch_end, fused_attention=attention != "eager",
                           model_and_tokenizer=(ctx.model, ctx.tok), fold_alibi=attention == "folded")
    finally:
        set_attention(ctx.model, "eager")


def time_group(ctx: Context, k: int, attention: str, max_tokens: int) -> dict:
    """One entry of ``res["group"]``: ``k`` prompts, two epochs of ``--group-steps`` steps, epoch 2 timed."""
    steps = ctx.a.group_steps
    n = min([steps * 8] + [len(ctx.data[t]) for t, _ in members(k)])
    cfgs = configs(ctx, members(k), max_epochs=2, patience=3, max_train_examples=n, max_eval_examples=1,
                   max_tokens_per_forward=max_tokens)
    speed = {}

    def on_epoch_end(i, metrics, state):
        if metrics["epoch"] == 2:
            speed[i] = metrics["train_tokens_per_s"]

    with PeakMemory(ctx.dev) as mem:
        run_group(ctx, cfgs, attention, on_epoch_end)
    counts = [epoch_counts(ctx, c.task, n) for c in cfgs]
    # the prompts' epochs end on the same step; the first evaluated has the loop's pure training time (each later
    # one's clock also ran through the evaluations before it)
    seconds = min(tokens / speed[i] for i, (tokens, _) in enumerate(counts))
    flops = sum(f for _, f in counts) / seconds
    return {"tokens_per_s": sum(t for t, _ in counts) / seconds, "seconds": seconds, "steps": -(-n // 8),
            "tflops": flops / 1e12, "mfu": flops / ctx.peak_flops(ctx.a.precision),
            "peak_mib": mem.peak / 2**20 if mem.peak is not None else None}


def group(ctx: Context) -> None:
    """One trial and trial groups, each timed through ``train_group`` (``res["group"]``)."""
    sizes = (2, 4) if ctx.a.smoke else (4, 8, 16)
    big, budget = sizes[-1], ctx.a.max_tokens_per_forward
    plan = [(1, "eager", 0), (1, "fused", 0), (1, "folded", 0), *[(k, "fused", 0) for k in sizes],
            (big, "folded", 0), (big, "fused", budget), (big, "folded", budget)]
    out = ctx.res["group"] = []
    for k, attention, max_tokens in plan:
        label = (f"{'one trial' if k == 1 else f'group of {k}'}, {attention}"
                 f"{f', {max_tokens} tokens per forward' if max_tokens else ''}")
        entry = {"mode": label, "prompts": k, "attention": attention, "max_tokens": max_tokens, "rows_per_step": 8 * k}
        if ctx.over_budget(needs=30):
            entry["error"] = "skipped: time budget spent"
        else:
            try:
                entry.update(time_group(ctx, k, attention, max_tokens))
            except Exception as err:  # noqa: BLE001 - out of memory, or a kernel that refuses: recorded
                entry["error"] = error_line(err)
            if ctx.dev == "cuda":
                torch.cuda.empty_cache()
        log(f"  {label}: {entry.get('tokens_per_s', float('nan')):,.0f} tok/s")
        out.append(entry)
        ctx.save()


def study_attention(ctx: Context) -> str:
    """``--study-attention``; auto: eager on CPU, on CUDA the fused path that ran the largest group faster
    (``fused`` when the group section did not run)."""
    if ctx.a.study_attention != "auto":
        return ctx.a.study_attention
    if ctx.dev != "cuda":
        return "eager"
    groups = [e for e in ctx.res.get("group", []) if "tokens_per_s" in e and e["prompts"] > 1 and not e["max_tokens"]]
    big = max((e["prompts"] for e in groups), default=0)
    speed = {e["attention"]: e["tokens_per_s"] for e in groups if e["prompts"] == big}
    return "folded" if speed.get("folded", 0) > speed.get("fused", float("inf")) else "fused"


class _Cap(Exception):
    pass


def run_study(ctx: Context, epochs: int, patience: int, cap: float) -> dict:
    """The 16 prompts in one group for at most ``epochs`` epochs, stopped after ``cap`` seconds, then the 68
    evaluations of the best prompts; wall times, epochs run and the cost of each epoch."""
    attention = study_attention(ctx)
    cfgs = configs(ctx, members(len(TASKS) * len(SEEDS)), max_epochs=epochs, patience=patience,
                   max_tokens_per_forward=ctx.a.max_tokens_per_forward)
    timeline, best = [], {}
    t0 = time.perf_counter()

    def on_epoch_end(i, metrics, state):
        timeline.append([round(time.perf_counter() - t0, 3), i, metrics["epoch"], metrics["eval_loss"]])
        best[i] = state["best"]["prompt"]
        if time.perf_counter() - t0 > cap:
            raise _Cap

    results, finished = None, True
    with PeakMemory(ctx.dev) as mem:
        try:
            results = run_group(ctx, cfgs, attention, on_epoch_end)
        except _Cap:
            finished = False
        sync(ctx.dev)
    train_s = time.perf_counter() - t0
    epochs_run = [max((e for _, j, e, _ in timeline if j == i), default=0) for i in range(len(cfgs))]
    log(f"  training {'finished' if finished else 'stopped by the cap'} after {train_s:.0f} s; epochs {epochs_run}")
    prompts = [r.prompt for r in results] if results else [best[i] for i in range(len(cfgs)) if i in best]
    jobs = [None] + prompts  # no prompt and every prompt, scored together per target task
    set_attention(ctx.model, attention)
    t1, done = time.perf_counter(), 0
    autocast = (lambda: torch.autocast(ctx.dev, dtype=torch.bfloat16)) if ctx.a.precision == "bf16" else None
    try:
        for t in TASKS:
            evaluate_prompts(ctx.model, ctx.val[t], jobs, ctx.a.eval_batch_size, ctx.pad, ctx.eos, device=ctx.dev,
                             autocast=autocast)
            done += len(jobs)
        sync(ctx.dev)
    finally:
        set_attention(ctx.model, "eager")
    eval_s = time.perf_counter() - t1
    return {"prompts": len(cfgs), "max_epochs": epochs, "patience": patience, "attention": attention,
            "max_tokens_per_forward": ctx.a.max_tokens_per_forward, "eval_batch_size": ctx.a.eval_batch_size,
            "finished": finished, "cap_seconds": cap, "train_seconds": train_s, "epochs_run": epochs_run,
            "stopped_early": [r.metrics["stopped_early"] for r in results] if results else None,
            "per_epoch": per_epoch(ctx, cfgs, timeline), "evaluations": done, "evaluations_planned": EVALUATIONS,
            "eval_seconds": eval_s, "wall_seconds": train_s + eval_s,
            "peak_gib": mem.peak / 2**30 if mem.peak is not None else None, "timeline": timeline}


def per_epoch(ctx: Context, cfgs, timeline) -> list[dict]:
    """For epoch e: the seconds from the moment every prompt had finished epoch e-1 to the moment every prompt
    that ran epoch e had finished it (its training and validation), and the tokens its prompts trained on."""
    tokens = {t: epoch_counts(ctx, t)[0] for t in TASKS}
    out, last = [], 0.0
    for e in range(1, max((x[2] for x in timeline), default=0) + 1):
        ran = [(s, i) for s, i, epoch, _ in timeline if epoch == e]
        end = max(s for s, _ in ran)
        n = sum(tokens[cfgs[i].task] for _, i in ran)
        out.append({"epoch": e, "seconds": end - last, "prompts": len(ran), "tokens": n,
                    "tokens_per_s": n / max(end - last, 1e-9)})
        last = end
    return out


def study_epochs(ctx: Context) -> None:
    """The study for exactly ``--study-epochs`` epochs, early stopping off (``res["study_epochs"]``), and the
    whole study's wall time extrapolated from it (an estimate, labelled so)."""
    n = ctx.a.study_epochs
    r = run_study(ctx, n, n + 1, cap(ctx, float("inf")))
    epochs = r["per_epoch"][1:] or r["per_epoch"]  # epoch 1 also pays the warm-up
    r["epoch_seconds_estimate"] = sum(e["seconds"] for e in epochs) / len(epochs)
    r["whole_study_seconds_estimate_no_early_stopping"] = 50 * r["epoch_seconds_estimate"] + r["eval_seconds"]
    ctx.res["study_epochs"] = r


def study(ctx: Context) -> None:
    """The whole study under its cap (``res["study"]``)."""
    ctx.res["study"] = run_study(ctx, 2 if ctx.a.smoke else 50, 5, cap(ctx, ctx.a.study_seconds))


def cap(ctx: Context, seconds: float) -> float:
    """A study's training cap: ``seconds``, or less where the time budget ends sooner (the 68 evaluations come
    after the training: a minute is kept for them)."""
    a = ctx.a
    left = (a.time_budget - (time.perf_counter() - ctx.t_start)) if a.time_budget else float("inf")
    return max(1.0, min(seconds, left - (10 if a.smoke else 60)))
