"""Training throughput: ptray's step vs PEFT ``PromptTuningConfig`` (TEXT init) + ``transformers.Trainer``.

Same model, data, batch size, precision and number of virtual tokens on both sides; the windows alternate between
the two. Results under ``res["train"]``: per task and for the study's token mix, each side's ``summarize`` dict and
``ratio`` = ptray tokens/s / reference tokens/s.
"""

from __future__ import annotations

from benchmarks import variants as V
from benchmarks.context import Context, log
from ptray.data.tasks import get_task


def train(ctx: Context) -> None:
    """Both sides on each task, ``--repeats`` alternating windows each, then the study mix (``res["train"]``)."""
    a, out = ctx.a, {}
    for task in a.tasks:
        def reference(memory_pass=False, task=task):
            return V.reference_train(ctx.model, ctx.tok, ctx.tok_dir, get_task(task).init_text,
                                     int(ctx.init[task].shape[0]), ctx.data[task], device=ctx.dev,
                                     precision=a.precision, batch_size=a.batch_size, warmup=a.warmup,
                                     steps=1 if memory_pass else a.steps, shape=ctx.shape,
                                     memory=True if memory_pass else None, expect_init=ctx.init[task])

        def mine(memory_pass=False, task=task):
            return ctx.run_ptray(task, memory_pass=memory_pass)

        ptray, ref = ctx.compare(mine, reference, a.repeats)
        out[task] = {"ptray": ptray, "reference": ref, "ratio": ptray["tokens_per_s"] / ref["tokens_per_s"]}
        log(f"  {task}: ptray {ptray['tokens_per_s']:.0f} tok/s, reference {ref['tokens_per_s']:.0f} tok/s, "
            f"x{out[task]['ratio']:.2f}")
    study = {side: ctx.study_weighted({t: out[t][side] for t in a.tasks}) for side in ("ptray", "reference")}
    study["ratio"] = study["ptray"]["tokens_per_s"] / study["reference"]["tokens_per_s"]
    out["study"] = study
    ctx.res["train"] = out
