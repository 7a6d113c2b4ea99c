"""The paper study's cost: its FLOPs with bloomz-560m's shape, and its minutes on one H100, estimated at assumed
MFUs, or measured when the run is the bloomz-560m GPU run.

The paper study (issue 5): 4 tasks x 4 seeds x 50 epochs, one validation pass per epoch, plus 68 evaluations
(16 prompts x 4 tasks + 4 without a prompt); ~340k bloomz-tokenizer tokens per epoch over the four train sets.
"""

from __future__ import annotations

from benchmarks.context import Context
from benchmarks.measure import Shape
from benchmarks.models import SHAPES

PAPER_TASKS = ("cb", "rte", "copa", "wsc")
SEEDS, EPOCHS, EXTRA_EVALS, ISSUE_EPOCH_TOKENS = 4, 50, 68, 340_000
H100_BF16_PEAK = 800e12  # the issue's measured H100 dense bf16 matmul FLOP/s, for estimates made without a GPU
_C = SHAPES["bloomz-560m"]
BLOOMZ_560M = Shape.from_config(hidden=_C["hidden_size"], n_layer=_C["n_layer"], vocab=_C["vocab_size"])


def study_estimate(ctx: Context) -> dict:
    """Paper-study wall time. FLOPs: bloomz-560m's formula over this run's examples, and scaled to the issue's
    token count (its tokenizer is bloomz's; ours, a 559-word BPE, makes ~2x more tokens of the same text).
    Minutes: at assumed MFUs of the issue's H100 peak; measured, when this run is the bloomz-560m GPU run.

    Returns the ``res["study_estimate"]`` entry: ``train_pflop`` and ``eval_pflop`` (this run's tokenizer),
    ``pflop_at_issue_tokens``, ``minutes_at_mfu`` ({"25%": minutes, ...}) and, when measured, ``minutes``.
    """
    a, res = ctx.a, ctx.res
    tasks = a.tasks
    epoch_tokens = sum(ctx.epoch_tokens[t] for t in tasks)
    train_flops = val_flops = 0.0
    for t in tasks:
        n = int(ctx.init[t].shape[0])
        per_epoch = sum(BLOOMZ_560M.train_flops(len(d.source) + len(d.answers[d.label]) + n,
                                                len(d.answers[d.label]) + 1) for d in ctx.data[t])
        per_eval = sum(BLOOMZ_560M.eval_flops(n, len(d.source), [len(x) for x in d.answers])
                       for d in ctx.val[t] if d.label is not None)
        train_flops += per_epoch * SEEDS * EPOCHS
        val_flops += per_eval * (SEEDS * EPOCHS + EXTRA_EVALS / len(tasks))
    # the issue's ~340k tokens per epoch are for all four train sets; a subset of tasks is not scaled
    scale = ISSUE_EPOCH_TOKENS / epoch_tokens if set(tasks) == set(PAPER_TASKS) and not a.max_train_examples else 1.0
    total = (train_flops + val_flops) * scale
    out = {"tasks": tasks, "epoch_tokens_this_tokenizer": epoch_tokens, "epoch_tokens_issue": ISSUE_EPOCH_TOKENS,
           "scale_to_issue_tokens": scale, "train_pflop": train_flops / 1e15, "eval_pflop": val_flops / 1e15,
           "pflop_at_issue_tokens": total / 1e15, "assumed_peak_flops": H100_BF16_PEAK,
           "minutes_at_mfu": {f"{m:.0%}": total / (m * H100_BF16_PEAK) / 60 for m in (0.25, 0.35, 0.5)}}
    if ctx.dev == "cuda" and a.model_shape == "bloomz-560m" and "train" in res:
        # measured: the best training throughput (one trial, packed trials, or trial processes together)
        options = {"one trial": res["train"]["study"]["ptray"]["tokens_per_s"]}
        for k, p in res.get("packed", {}).items():
            options[f"{k} trials packed"] = p["study"]["tokens_per_s"]
        for k, c in res.get("concurrency", {}).items():
            if c["all_ok"]:
                options[f"{k} trial processes"] = c["tokens_per_s"]
        best = max(options, key=options.get)
        train_s = epoch_tokens * scale * SEEDS * EPOCHS / options[best]
        ev = res.get("eval", {})
        eval_s = scale * sum(ev[t]["ptray"]["seconds"] * (SEEDS * EPOCHS + EXTRA_EVALS / len(tasks))
                             for t in tasks if t in ev)
        out.update(throughput_options=options, best=best, train_minutes=train_s / 60, eval_minutes=eval_s / 60,
                   minutes=(train_s + eval_s) / 60,
                   note="evaluations counted one after another at one trial's speed (conservative)")
    return out
