"""Each of ptray's techniques alone: ptray's step vs ptray's step with that one thing done the usual way.

``ABLATIONS`` is the table of named variants, in order of priority (a GPU run under its time budget drops the
last ones first). Results under ``res["ablations"][name]``: both sides' study-mix throughput, ``ptray_gain`` =
ptray tokens/s / variant tokens/s (> 1: the technique pays), and per task the windows of each side.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from benchmarks import variants as V
from benchmarks.context import Context, log
from benchmarks.measure import mib
from benchmarks.variants import StepResult


@dataclass
class Variant:
    """The usual way, ready to run on one context."""

    run: Callable[..., StepResult]  # (task, memory_pass=False) -> one window, as ``Context.run_ptray``
    precision: str | None = None  # the variant's precision, when not the run's
    tasks: list[str] | None = None  # instead of ``--ablation-tasks``
    repeats: int | None = None  # instead of ``--ablation-repeats``
    record: dict = field(default_factory=dict)  # extra entries for the results, filled in as it runs


@dataclass(frozen=True)
class Ablation:
    """One technique of ptray's, measured by switching it back to the usual way."""

    what: str  # the usual way, as the markdown's "variant" column says it
    variant: Callable[[Context], Variant]
    compiles: bool = False  # compiles first (minutes): not in --smoke; on CUDA only with 150 s of budget left


def _ptray_with(**kw) -> Callable[[Context], Variant]:
    """The variant that is ptray's step with these arguments of ``Context.run_ptray``."""
    return lambda ctx: Variant(partial(ctx.run_ptray, **kw))


def _patched(patch) -> Callable[[Context], Variant]:
    """The variant that is ptray's step with the model inside ``patch(model)`` (a context manager) for its windows
    only."""
    def variant(ctx: Context) -> Variant:
        def run(task, memory_pass=False):
            with patch(ctx.model):
                return ctx.run_ptray(task, memory_pass=memory_pass)
        return Variant(run)
    return variant


def _other_precision(ctx: Context) -> Variant:
    """fp32 on a bf16 run, bf16 on an fp32 run, on a copy of the model in that dtype."""
    alt = "no" if ctx.a.precision == "bf16" else "bf16"
    model = copy.deepcopy(ctx.model).to(torch.bfloat16 if alt == "bf16" else torch.float32)
    v = Variant(partial(ctx.run_ptray, model=model, precision=alt), precision=alt, record={"variant_precision": alt})
    if ctx.dev == "cpu" and alt == "bf16":
        # bf16 matmuls without CPU support run at ~1 GFLOP/s here: one short task, one window
        v.tasks, v.repeats = [min(ctx.a.ablation_tasks, key=lambda t: ctx.epoch_tokens[t] / len(ctx.data[t]))], 1
    return v


def _compiled(ctx: Context) -> Variant:
    """ptray's ``--compile``; the first window compiles, untimed, and its seconds are recorded."""
    record = {"compile_seconds": None}

    def run(task, memory_pass=False):
        with V.compiled_blocks(ctx.model):
            if record["compile_seconds"] is None:
                t0 = time.perf_counter()
                ctx.run_ptray(task)  # the first call compiles; untimed
                record["compile_seconds"] = time.perf_counter() - t0
            return ctx.run_ptray(task, memory_pass=memory_pass)
    return Variant(run, record=record)


ABLATIONS = {
    "full_logits": Ablation("LM head at every position, fp32 cross-entropy", _ptray_with(loss_fn=V.full_logits_loss)),
    "unsorted": Ablation("plain shuffled batches (no length grouping)", _ptray_with(grouped=False)),
    "precision": Ablation("other precision", _other_precision),
    "train_weights": Ablation("weights get gradients and Adam state", _ptray_with(train_weights=True)),
    "compile": Ablation("torch.compile of each block (ptray's `--compile`, off by default)", _compiled,
                        compiles=True),
    "sdpa": Ablation("BLOOM attention through SDPA (not in ptray)", _patched(V.sdpa_attention)),
}


def ablation(ctx: Context, name: str) -> None:
    """Measure ``ABLATIONS[name]`` against ptray's step, window by window, on each ablation task."""
    v = ABLATIONS[name].variant(ctx)
    tasks, base, alt = v.tasks or ctx.a.ablation_tasks, {}, {}
    for task in tasks:
        base[task], alt[task] = ctx.compare(partial(ctx.run_ptray, task), partial(v.run, task),
                                            v.repeats or ctx.a.ablation_repeats, v.precision)
    b, o = ctx.study_weighted(base), ctx.study_weighted(alt, v.precision)
    entry = {"tasks": tasks, "ptray": b, "variant": o, "ptray_gain": b["tokens_per_s"] / o["tokens_per_s"],
             "per_task": {t: {"ptray": base[t]["tokens_per_s"], "variant": alt[t]["tokens_per_s"],
                              "ptray_peak_mib": base[t]["peak_mib"], "variant_peak_mib": alt[t]["peak_mib"],
                              "ptray_runs": base[t]["runs_tokens_per_s"],
                              "variant_runs": alt[t]["runs_tokens_per_s"]}
                          for t in tasks}}
    entry.update(v.record)
    ctx.res.setdefault("ablations", {})[name] = entry
    log(f"  {name}: ptray {b['tokens_per_s']:.0f} tok/s vs variant {o['tokens_per_s']:.0f} tok/s "
        f"(ptray's way x{entry['ptray_gain']:.2f}; peak {mib(b['peak_mib'])} vs {mib(o['peak_mib'])} MiB)")
