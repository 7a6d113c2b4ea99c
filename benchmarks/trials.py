"""Several trials on one device at once: packed into one forward pass, or each in its own process.

``packed(ctx)`` (results ``res["packed"]``): K trials' prompts and batches of the same task in one
forward/backward per step (``variants.ptray_train_packed``), vs one trial alone.

``concurrency(ctx)`` (results ``res["concurrency"]``) runs ``run_concurrent``: K processes (as Ray runs
fractional-GPU trials); each builds the model, warms up, waits at a barrier, then trains for a fixed time with
ptray's step and reports its real tokens and peak memory. While they all run, the parent reads the device's used
memory, so a trial's footprint (weights, activations, CUDA context) is measured, not assumed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import time
import traceback
from functools import partial

import torch

from benchmarks import variants as V
from benchmarks.context import Context, log


def packed(ctx: Context) -> None:
    """For each K of ``--packed``: K trials packed on each ablation task, and their study-mix throughput against
    one trial's (from the training section). A K that runs out of device memory is recorded, not raised."""
    a, out = ctx.a, {}
    for k in a.packed:
        per_task = {}
        for task in a.ablation_tasks:
            streams = [ctx.batches(task, seed=seed)[0] for seed in range(k)]

            def run(memory_pass=False, streams=streams, task=task, k=k):
                s = [x[:a.warmup + 1] for x in streams] if memory_pass else streams
                return V.ptray_train_packed(ctx.model, s, [ctx.init[task]] * k, device=ctx.dev,
                                            precision=a.precision, warmup=a.warmup, shape=ctx.shape,
                                            memory=True if memory_pass else None)

            try:
                runs = ctx.with_memory([run() for _ in range(a.ablation_repeats)], partial(run, memory_pass=True))
            except torch.OutOfMemoryError as err:  # a finding (how many trials fit in one batch), not a crash
                ctx.res.setdefault("packed_out_of_memory", []).append(
                    f"{k} trials, {task}: {str(err).splitlines()[0]}")
                log(f"  {k} trials packed, {task}: out of memory")
                if ctx.dev == "cuda":
                    torch.cuda.empty_cache()
                break
            per_task[task] = ctx.summarize(runs)
        if len(per_task) < len(a.ablation_tasks):
            continue
        entry = {"per_task": per_task, "study": ctx.study_weighted(per_task)}
        if "train" in ctx.res:
            single = {t: ctx.res["train"][t]["ptray"] for t in a.ablation_tasks}
            entry["gain_vs_one_trial"] = entry["study"]["tokens_per_s"] / ctx.study_weighted(single)["tokens_per_s"]
        out[str(k)] = entry
        log(f"  {k} trials packed: {entry['study']['tokens_per_s']:.0f} tok/s, MFU {entry['study']['mfu']:.1%}")
    ctx.res["packed"] = out


def concurrency(ctx: Context) -> None:
    """For each K of ``--trials``: K trial processes at once (``run_concurrent``), the tasks dealt round-robin."""
    a, out = ctx.a, {}
    for k in a.trials:
        cfg = {"device": ctx.dev, "precision": a.precision, "shape": a.model_shape, "batch_size": a.batch_size,
               "warmup": a.warmup, "seconds": a.trial_seconds, "start_timeout": 240.0,
               "tokenizer_size": len(ctx.tok), "pad_id": ctx.pad, "eos_id": ctx.eos,
               "cpu_threads": max(1, (a.threads or os.cpu_count() or 1) // k)}
        r = run_concurrent(k, cfg, [ctx.data[t] for t in a.tasks], [ctx.init[t] for t in a.tasks])
        out[str(k)] = r
        log(f"  {k} trial processes: all ok {r['all_ok']}, {r['tokens_per_s']:.0f} tok/s together"
            + (f", {r['footprint_per_trial'] / 2**30:.2f} GiB each, ~{r['max_trials_estimate']} fit"
               if r.get("footprint_per_trial") else "") + (f"; errors {r['errors']}" if r["errors"] else ""))
    ctx.res["concurrency"] = out


def _epochs(data, batch_size, seed, pad_id, eos_id):
    """ptray's length-grouped batches, epoch after epoch, made as the loop reaches them (as ``train`` does)."""
    from ptray.data.batching import train_batches

    epoch = 0
    while True:
        epoch += 1
        yield from train_batches(data, batch_size, seed, epoch, pad_id, eos_id)


def _worker(rank, cfg, data, init, barrier, results):
    try:
        from benchmarks.models import build_bloom
        from benchmarks.variants import answer_loss, autocast_factory, optimizer_step

        device = cfg["device"]
        if device == "cpu":
            torch.set_num_threads(cfg["cpu_threads"])
        dtype = torch.bfloat16 if cfg["precision"] == "bf16" else torch.float32
        t_start = time.perf_counter()
        model = build_bloom(cfg["shape"], cfg["tokenizer_size"], device, dtype, seed=0)
        pad, eos = cfg["pad_id"], cfg["eos_id"]
        batches = _epochs(data, cfg["batch_size"], rank, pad, eos)
        prompt = torch.nn.Parameter(init.to(device=device, dtype=torch.float32).clone())
        opt = torch.optim.Adam([prompt], lr=3e-2)
        autocast = autocast_factory(device, cfg["precision"])

        def step(batch):
            batch = batch.to(device)
            optimizer_step(partial(answer_loss, model, batch, prompt), [opt], autocast)
            return int(batch.attention_mask.sum())

        for _ in range(cfg["warmup"]):
            step(next(batches))
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ready_s = time.perf_counter() - t_start
        barrier.wait(timeout=cfg["start_timeout"])
        t0 = time.perf_counter()
        tokens = steps = 0
        while time.perf_counter() - t0 < cfg["seconds"]:
            tokens += step(next(batches))
            steps += 1
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_reserved() if device == "cuda" else 0
        results.put({"rank": rank, "ok": True, "tokens": tokens, "steps": steps, "seconds": seconds,
                     "peak_reserved": peak, "ready_s": ready_s})
    except BaseException as err:  # reported to the parent: an OOM here is a finding, not a crash
        try:
            barrier.abort()
        except Exception:
            pass
        results.put({"rank": rank, "ok": False, "error": f"{type(err).__name__}: {err}",
                     "trace": traceback.format_exc()[-2000:]})


def run_concurrent(k: int, cfg: dict, datas: list, inits: list, timeout: float = 120.0) -> dict:
    """Run ``k`` trial processes (trial i trains ``datas[i % len(datas)]``); aggregate their throughput."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(k + 1)
    results = ctx.Queue()
    used_before = _device_used(cfg["device"])
    procs = [ctx.Process(target=_worker, args=(r, cfg, datas[r % len(datas)], inits[r % len(inits)], barrier,
                                               results), daemon=True) for r in range(k)]
    t_start = time.perf_counter()
    for p in procs:
        p.start()
    used_during = None
    try:
        barrier.wait(timeout=cfg["start_timeout"])
        time.sleep(cfg["seconds"] / 2)
        used_during = _device_used(cfg["device"])
    except Exception:  # a worker failed before the barrier (e.g. out of memory): collect its report below
        pass
    out = []
    deadline = time.perf_counter() + cfg["seconds"] + timeout
    while len(out) < k and time.perf_counter() < deadline:
        try:
            out.append(results.get(timeout=1.0))
        except queue_mod.Empty:
            if not any(p.is_alive() for p in procs) and results.empty():
                break
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    ok = [r for r in out if r.get("ok")]
    res = {
        "trials": k,
        "all_ok": len(ok) == k,
        "errors": [r["error"] for r in out if not r.get("ok")][:3],
        "wall_s": time.perf_counter() - t_start,
        "tokens_per_s": sum(r["tokens"] / r["seconds"] for r in ok),
        "per_trial_tokens_per_s": [r["tokens"] / r["seconds"] for r in ok],
        "peak_reserved_per_trial": max((r["peak_reserved"] for r in ok), default=0),
        "model_ready_s": max((r["ready_s"] for r in ok), default=None),
    }
    if used_during is not None and used_before is not None:
        total = _device_total(cfg["device"])
        per_trial = (used_during - used_before) / k
        res.update(device_used_before=used_before, device_used_during=used_during, device_total=total,
                   footprint_per_trial=per_trial, max_trials_estimate=int((total - used_before) // per_trial)
                   if per_trial > 0 else None)
    return res


def _device_used(device: str):
    if device != "cuda":
        return None
    free, total = torch.cuda.mem_get_info()
    return total - free


def _device_total(device: str):
    return torch.cuda.mem_get_info()[1] if device == "cuda" else None
