"""Evaluation of the validation sets: ptray's one-pass ``evaluate`` vs batched greedy ``generate``.

Each method runs once untimed (its warm-up; on CPU also its profiled memory run), then ``--ablation-repeats``
timed times; the median counts. Results under ``res["eval"]``: per task, each method's examples/s, tokens/s,
peak memory and exact match, the speedups over ``generate`` and whether every method's exact match agrees example
by example; ``"all"``: the speedups over the summed seconds of every task.
"""

from __future__ import annotations

from functools import partial

from benchmarks import variants as V
from benchmarks.context import Context, log
from benchmarks.measure import PeakMemory, median, timed

# result key -> (the slower method, the faster one): speedup = seconds of the first / seconds of the second
SPEEDUPS = {
    "speedup": ("generate", "ptray"),
    "speedup_em_only": ("generate", "ptray_em_only"),
    "speedup_vs_sorted_generate": ("generate_sorted", "ptray"),
    "speedup_per_label": ("generate", "ptray_per_label"),
}


def methods(ctx: Context, task: str) -> dict:
    """The ways to evaluate ``task``'s validation set with its init prompt, by result key: each a function of
    nothing that returns exact match per labeled example (or an ``EvalResult`` that holds it)."""
    a, val, init = ctx.a, ctx.val[task], ctx.init[task].to(ctx.dev)
    kw = dict(batch_size=a.eval_batch_size, pad_id=ctx.pad, eos_id=ctx.eos, device=ctx.dev, precision=a.precision)
    return {
        "ptray": partial(V.ptray_evaluate, ctx.model, val, init, **kw),
        "ptray_em_only": partial(V.ptray_evaluate, ctx.model, V.gold_only(val), init, share_source=False, **kw),
        # the same numbers as "ptray" with one pass per (example, label) sequence: the source is not shared
        "ptray_per_label": partial(V.ptray_evaluate, ctx.model, val, init, share_source=False, **kw),
        "generate": partial(V.generate_exact_match, ctx.model, val, init, **kw),
        "generate_sorted": partial(V.generate_exact_match, ctx.model, val, init, sort=True, **kw),
    }


def evaluate(ctx: Context) -> None:
    """Every method of ``methods`` on each task's validation set, timed and compared (``res["eval"]``)."""
    a, out = ctx.a, {}
    for task in a.tasks:
        val, n_prompt = ctx.val[task], int(ctx.init[task].shape[0])
        n_ex = sum(d.label is not None for d in val)
        gold_tokens = sum(len(d.source) + len(d.answers[d.label]) for d in val if d.label is not None)
        res, em, fns = {}, {}, methods(ctx, task)
        for name, fn in fns.items():
            with PeakMemory(ctx.dev, True) as mem:  # also the warm-up; on CPU the only profiled run
                fn()
            secs, peaks = [], [mem.peak]
            for _ in range(a.ablation_repeats):
                with PeakMemory(ctx.dev) as mem, timed(ctx.dev) as t:
                    r = fn()
                secs.append(t["s"])
                peaks.append(mem.peak)
            peaks = [p for p in peaks if p is not None]
            em[name] = r.em_correct if hasattr(r, "em_correct") else r
            s = median(secs)
            res[name] = {"seconds": s, "examples_per_s": n_ex / s, "tokens_per_s": gold_tokens / s,
                         "peak_mib": max(peaks) / 2**20 if peaks else None, "exact_match": sum(em[name]) / n_ex}
        flops = sum(ctx.shape.eval_flops(n_prompt, len(d.source), [len(x) for x in d.answers])
                    for d in val if d.label is not None)
        res["ptray"].update(model_flops=flops, precision=a.precision,
                            mfu=flops / res["ptray"]["seconds"] / ctx.peak_flops(a.precision))
        res.update({k: res[slow]["seconds"] / res[fast]["seconds"] for k, (slow, fast) in SPEEDUPS.items()})
        res["em_agree"] = sum(x == y for x, y in zip(em["ptray"], em["generate"])) / n_ex
        res["em_agree_all_methods"] = all(em[m] == em["ptray"] for m in em)
        res["examples"] = n_ex
        out[task] = res
        log(f"  {task}: ptray eval {res['ptray']['examples_per_s']:.1f} ex/s, generate "
            f"{res['generate']['examples_per_s']:.1f} ex/s, x{res['speedup']:.2f}, EM agree {res['em_agree']:.2f}")
    secs = {m: sum(out[t][m]["seconds"] for t in a.tasks) for m in fns}
    out["all"] = {"seconds": secs, **{k: secs[slow] / secs[fast] for k, (slow, fast) in SPEEDUPS.items()}}
    ctx.res["eval"] = out
