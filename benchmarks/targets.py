"""The conclusions of a run: MFUs against the final matmul peak, paired-window ratios, the study estimate, and
which of issue 5's targets are met. Runs after the measurements, and again on ``--render-only``.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.context import Context
from benchmarks.measure import median
from benchmarks.study_estimate import study_estimate

NEEDS_GPU = "needs the bloomz-560m shape, bf16, GPU"


@dataclass(frozen=True)
class Target:
    """One target of issue 5."""

    name: str  # as the markdown's table says it
    goal: float
    goal_text: str
    lower_is_better: bool = False

    def judge(self, value) -> dict:
        """``{"status": "met" | "not met", "value", "goal"}``, or ``{"status": "unmeasured"}`` for None."""
        if value is None:
            return {"status": "unmeasured"}
        ok = value <= self.goal if self.lower_is_better else value >= self.goal
        return {"status": "met" if ok else "not met", "value": value, "goal": self.goal}


TARGETS = {
    "train_ratio": Target("training tokens/s vs PEFT + Trainer", 3.0, ">= 3x"),
    "eval_speedup": Target("exact-match eval vs generate", 5.0, ">= 5x"),
    "mfu": Target("MFU, bloomz-560m shape, bf16", 0.35, ">= 35%"),
    "concurrent_trials": Target("concurrent trials on one GPU", 8, ">= 8"),
    "study_minutes": Target("paper study, minutes of one H100", 4.0, "<= 4", lower_is_better=True),
}


def conclude(ctx: Context) -> None:
    """Recompute every MFU with the final peak, add the paired ratios, ``res["study_estimate"]`` and
    ``res["targets"]``."""
    a, res = ctx.a, ctx.res
    refresh_mfu(res, ctx.peak_flops)
    paired(ctx)
    study = study_estimate(ctx)
    res["study_estimate"] = study
    t = {}
    tr = res.get("train", {}).get("study")
    t["train_ratio"] = TARGETS["train_ratio"].judge(tr and tr["ratio"])
    ev = res.get("eval", {}).get("all")
    t["eval_speedup"] = TARGETS["eval_speedup"].judge(ev and ev["speedup"])
    full_shape = a.model_shape == "bloomz-560m" and ctx.dev == "cuda" and a.precision == "bf16"
    mfus = ([tr["ptray"]["mfu"]] if tr else []) + [p["study"]["mfu"] for p in res.get("packed", {}).values()]
    t["mfu"] = TARGETS["mfu"].judge(max(mfus, default=None)) if full_shape else {"status": "unmeasured",
                                                                                "why": NEEDS_GPU}
    fits = [int(k) for k, v in res.get("concurrency", {}).items() if v["all_ok"]]
    if full_shape:
        t["concurrent_trials"] = TARGETS["concurrent_trials"].judge(max(fits, default=0))
        t["study_minutes"] = TARGETS["study_minutes"].judge(study.get("minutes"))
        if "H100" not in res["meta"].get("gpu", ""):
            t["study_minutes"]["note"] = f"measured on {res['meta'].get('gpu')}, not an H100"
    else:
        for k in ("concurrent_trials", "study_minutes"):
            t[k] = {"status": "unmeasured", "why": NEEDS_GPU}
    res["targets"] = t


def paired(ctx: Context) -> None:
    """Ratios of windows run back to back (ptray, then the alternative): on a shared machine whose load drifts,
    the median of these pairs is steadier than the ratio of the two medians. Both are reported."""
    res = ctx.res
    tr = res.get("train")
    if tr:
        tasks = [t for t in tr if t != "study"]
        for t in tasks:
            p, q = tr[t]["ptray"]["runs_tokens_per_s"], tr[t]["reference"]["runs_tokens_per_s"]
            tr[t]["paired_ratio"] = median([x / y for x, y in zip(p, q)])
        windows = min(len(tr[t]["ptray"]["runs_tokens_per_s"]) for t in tasks)
        w = {t: ctx.epoch_tokens[t] for t in tasks}
        ratios = []
        for i in range(windows):  # the study mix of window i of every task, each side
            secs = [sum(w[t] / tr[t][side]["runs_tokens_per_s"][i] for t in tasks) for side in ("ptray", "reference")]
            ratios.append(secs[1] / secs[0])
        tr["study"]["paired_ratio"] = median(ratios)
    for e in res.get("ablations", {}).values():
        gains = []
        for t in e["tasks"]:
            pt = e["per_task"][t]
            if "ptray_runs" in pt:
                gains += [x / y for x, y in zip(pt["ptray_runs"], pt["variant_runs"])]
        if gains:
            e["paired_gain"] = median(gains)


def refresh_mfu(obj, peak_flops) -> None:
    """Recompute every MFU in the results with the final matmul peak (``peak_flops(precision)``, FLOP/s)."""
    if isinstance(obj, dict):
        if "mfu" in obj and "precision" in obj:
            if "model_flops" in obj:
                obj["mfu"] = obj["model_flops"] / obj["seconds"] / peak_flops(obj["precision"])
            elif "flops_per_token" in obj:
                obj["mfu"] = obj["tokens_per_s"] * obj["flops_per_token"] / peak_flops(obj["precision"])
        for v in obj.values():
            refresh_mfu(v, peak_flops)
