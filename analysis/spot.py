"""SPoT (Vu et al. 2022): a target task's prompt trained from a source task's trained prompt instead of its own
init text, and what predicts the gain.

A SPoT run is a train run tagged ``ptray.init_from`` (the source prompt's train run name, e.g. ``rte-seed0``; or
with ``init_source`` in its config). Its reference is the target's own run of the same seed that started from the
init text (not a SPoT run; ``init`` text), trained with the same budget (``max_epochs``, k epochs; a budget that
differs is noted). Per ordered (source, target) pair and metric:

- ``gain_mean``: mean over the seeds with both runs, and the examples both were scored on, of accuracy(from the
  source prompt) - accuracy(from the init text) on the target's validation split (each run's best epoch within k);
- ``ci95_seeds_examples_low/high``: the hierarchical bootstrap of ``transfer.hierarchical_bootstrap_ci`` on the
  [seeds, examples] matrix of per-example differences (paired: both runs scored on the same examples).

Beside the gain: the zero-shot transfer matrix (the transfer section's delta over no prompt) and the distances
between the tasks' prompts (the predictors section's [T, T] matrices). Which predicts the gain: the Mantel test of
``analysis.correlation`` over the ordered pairs (source != target), as for zero-shot transfer; it needs 3 or more
tasks.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from analysis import correlation, figures, paired, transfer, views
from analysis.records import PromptRun, Study
from analysis.results import Output, Section

METRICS = transfer.METRICS
# predictors of the SPoT gain: the distances of the predictors section, and the zero-shot transfer gain
SPOT_PREDICTORS = {
    "frobenius_raw": ("Frobenius distance, raw (paper)", -1),
    "frobenius_effective": ("Frobenius distance, effective", -1),
    "rms_row_distance_raw": ("rms row distance, raw", -1),
    "rms_row_distance_effective": ("rms row distance, effective", -1),
    "spot_cosine_raw": ("SPoT cosine of mean-pooled prompts, raw", 1),
    "spot_cosine_effective": ("SPoT cosine, effective", 1),
    "zero_shot_delta_exact_match": ("zero-shot transfer, Δ exact match", 1),
}
_NAME = re.compile(r"^(?P<task>.+?)-seed(?P<seed>\d+)(?:-(?P<condition>.+))?$")


def source_of(p: PromptRun, by_label: dict[str, PromptRun]) -> tuple[str, int | None] | None:
    """(source task, source seed) of SPoT run ``p``: its ``init_from`` run name looked up among the study's
    prompts, else read from the name (``rte-seed0``, ``rte-seed0-text``); None when neither tells."""
    name = p.init_from or p.config.get("init_source")
    if not name:
        return None
    name = str(name)
    if name in by_label:
        return by_label[name].task, by_label[name].seed
    m = _NAME.match(name.rstrip("/").rsplit("/", 1)[-1])
    return (m["task"], int(m["seed"])) if m else None


def _reference(p: PromptRun, plain: list[PromptRun], condition: str | None) -> PromptRun | None:
    """The target's init-text run of the same seed: not a SPoT run, ``init`` text; in ``condition`` when there
    are several."""
    cands = [q for q in plain if q.task == p.task and q.seed == p.seed and q.config.get("init", "text") == "text"]
    if len(cands) > 1:
        cands = [q for q in cands if q.condition == condition] or cands
    return cands[0] if cands else None


def gain_tables(study: Study, n_boot: int = 2000, seed: int = 0, condition: str | None = None
                ) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """``(per_seed, summary, notes)``: per_seed has one row per SPoT run and metric (source, source_seed, target,
    seed, metric, accuracy_spot, accuracy_text, gain, n_examples, epochs budget k, spot and reference run ids);
    summary one row per (source, target, metric): n_seeds, n_examples, k, accuracy_spot_mean, accuracy_text_mean,
    gain_mean, gain_sd_ddof1 (over seeds) and ci95_seeds_examples_low/high. Fractions (0-1)."""
    by_label = {p.label: p for p in study.prompts}
    plain = [p for p in study.prompts if not views.is_spot(p)]
    spot = [p for p in study.prompts if views.is_spot(p)]
    notes: list[str] = []
    per_seed, unresolved, unreferenced, budgets = [], [], [], []
    cells: dict[tuple[str, str, str], list] = {}
    for p in sorted(spot, key=lambda p: (p.task, p.seed)):
        src = source_of(p, by_label)
        if src is None:
            unresolved.append(p.label)
            continue
        ref = _reference(p, plain, condition)
        if ref is None:
            unreferenced.append(p.label)
            continue
        k = p.config.get("max_epochs")
        if k != ref.config.get("max_epochs"):
            budgets.append(f"{p.label} ({k}) vs {ref.label} ({ref.config.get('max_epochs')})")
        for m in METRICS:
            mat, idx = paired.correctness_matrix([p, ref], m)
            if idx:
                acc_s, acc_t = float(mat[0].mean()), float(mat[1].mean())
            else:  # recorded metrics only: no interval
                acc_s, acc_t = p.metrics.get(m), ref.metrics.get(m)
                if acc_s is None or acc_t is None:
                    continue
            per_seed.append({"source": src[0], "source_seed": src[1], "target": p.task, "seed": p.seed,
                             "metric": m, "accuracy_spot": acc_s, "accuracy_text": acc_t, "gain": acc_s - acc_t,
                             "n_examples": len(idx) or None, "k_epochs": k,
                             "epochs_run_spot": p.metrics.get("epochs_run"), "spot_run": p.run_id,
                             "text_run": ref.run_id})
            cells.setdefault((src[0], p.task, m), []).append((idx, mat[0] - mat[1] if idx else None, acc_s, acc_t, k))
    if unresolved:
        notes.append(f"SPoT runs without a readable source prompt left out: {', '.join(unresolved)}")
    if unreferenced:
        notes.append(f"SPoT runs without an init-text run of their task and seed left out: {', '.join(unreferenced)}")
    if budgets:
        notes.append(f"SPoT runs trained with another budget (max_epochs) than their init-text run: "
                     f"{', '.join(budgets)}")
    summary = []
    for (source, target, m), entries in cells.items():
        gains = [a - b for _, _, a, b, _ in entries]
        idx0 = entries[0][0]
        same_examples = all(e[1] is not None and e[0] == idx0 for e in entries)
        if same_examples:
            mat = np.stack([e[1] for e in entries])
            gain = float(mat.sum()) / mat.size
            lo, hi = transfer.hierarchical_bootstrap_ci(mat, n_boot, seed=seed)
        else:
            gain, (lo, hi) = float(np.mean(gains)), (np.nan, np.nan)
        summary.append({"source": source, "target": target, "metric": m, "n_seeds": len(entries),
                        "n_examples": len(idx0) or None, "k_epochs": entries[0][4],
                        "accuracy_spot_mean": float(np.mean([e[2] for e in entries])),
                        "accuracy_text_mean": float(np.mean([e[3] for e in entries])), "gain_mean": gain,
                        "gain_sd_ddof1": float(np.std(gains, ddof=1)) if len(gains) > 1 else np.nan,
                        "ci95_seeds_examples_low": lo, "ci95_seeds_examples_high": hi})
    return pd.DataFrame(per_seed), pd.DataFrame(summary), notes


def gain_matrix(summary: pd.DataFrame, metric: str, tasks: list[str], value: str = "gain_mean") -> pd.DataFrame:
    """[source, target] matrix of ``value`` for ``metric`` in ``tasks`` order (NaN where no SPoT run)."""
    return transfer.summary_matrix(summary, metric, value, tasks)


def spot_section(*, study: Study, tasks: list[str], n_boot: int, seed: int, condition: str | None,
                 predictors: dict[str, pd.DataFrame], zero_shot: pd.DataFrame) -> Section:
    """The SPoT gain matrix beside the zero-shot transfer matrix and the distances, and the Mantel test of each
    distance (and of zero-shot transfer) against the gain. ``tasks``: the trained tasks of the paper's sections;
    ``predictors``: their [T, T] matrices (``analysis.predictors.predictor_matrices``); ``zero_shot``: the transfer
    section's summary (``transfer.transfer_tables``; may be empty); ``condition``: the paper's condition (where a
    target has init-text runs in several conditions, its reference run)."""
    per_seed, summary, notes = gain_tables(study, n_boot, seed, condition)
    out = Section(summary={"spot": summary.to_dict(orient="records")}, notes=notes)
    if summary.empty:
        out.notes.append("SPoT: no SPoT run with a source prompt and an init-text run of its target: nothing to "
                         "compare")
        return out
    k = sorted({str(v) for v in summary["k_epochs"]})
    gains = {f"spot_gain_{m}": gain_matrix(summary, m, tasks) for m in METRICS}
    panels = []
    for m, name in (("exact_match", "exact match"), ("rank_accuracy", "rank accuracy")):
        mean, lo, hi = (gain_matrix(summary, m, tasks, v) for v in ("gain_mean", "ci95_seeds_examples_low",
                                                                    "ci95_seeds_examples_high"))
        text = mean.copy().astype(object)
        for a in tasks:
            for b in tasks:
                if np.isfinite(mean.loc[a, b]):
                    text.loc[a, b] = f"{mean.loc[a, b]:+.2f}" + (
                        f"\n[{lo.loc[a, b]:+.2f}, {hi.loc[a, b]:+.2f}]" if np.isfinite(lo.loc[a, b]) else "")
        panels.append((f"SPoT gain, {name}: from source prompt − from init text", figures.upper_labels(mean),
                       figures.upper_labels(text)))
    if not zero_shot.empty:
        z = transfer.summary_matrix(zero_shot, "exact_match", "delta_mean", tasks)
        panels.append(("zero-shot transfer, Δ exact match over no prompt", figures.upper_labels(z), None))
    if "frobenius_raw" in predictors:
        panels.append(("Frobenius distance, raw", figures.upper_labels(predictors["frobenius_raw"]), None))
    out.outputs.append(Output(
        "spot", "spot", "SPoT: gain from starting at another task's prompt",
        f"Row A, column B: accuracy on B's validation set of B's prompt trained for k = {', '.join(k)} epochs from "
        f"A's trained prompt, minus B's prompt trained from its own init text with the same seed and budget "
        f"(fractions; each run's best epoch). Each cell: the mean over seeds x examples and, in brackets, the 95% "
        f"hierarchical bootstrap interval (seeds and examples resampled together on the paired per-example "
        f"differences, {n_boot} resamples, seed {seed}). Beside it: zero-shot transfer (A's prompts on B without "
        f"training, Figure 8) and the raw Frobenius distance (Figure 7).", summary,
        figures.heatmaps_figure(panels, cmap="RdBu", center=0.0, colorbar_label="accuracy change / distance")))
    out.outputs.append(Output("spot_per_seed", "spot", "SPoT per seed",
                              "Every SPoT run against its init-text run: accuracies, gain, examples, runs.", per_seed,
                              show_table=False))
    if len(tasks) < 3:
        out.notes.append(f"SPoT: which distance predicts the gain not tested: the Mantel test needs 3 or more tasks, "
                         f"this study has {len(tasks)}")
        return out
    preds = {k: v for k, v in predictors.items() if k in SPOT_PREDICTORS}
    if not zero_shot.empty:
        preds["zero_shot_delta_exact_match"] = transfer.summary_matrix(zero_shot, "exact_match", "delta_mean", tasks)
    stats = correlation.correlation_table(preds, gains, tasks, seed=seed)
    out.summary["spot_correlations"] = stats.to_dict(orient="records")
    labels = {c: v[0] for c, v in SPOT_PREDICTORS.items()}
    signs = {c: v[1] for c, v in SPOT_PREDICTORS.items()}
    n_perm = int(stats["mantel_permutations"].iloc[0]) if len(stats) else 0
    out.outputs.append(Output(
        "spot_predictors", "spot", "Which distance predicts the SPoT gain",
        f"Spearman correlation of each predictor with the SPoT gain over the ordered task pairs (source != "
        f"target), with the Mantel p-value ({n_perm} relabellings of the {len(tasks)} task labels, as for "
        f"zero-shot transfer; naive p-values, which treat the pairs as independent, in the CSV). Distances should "
        f"correlate negatively, similarities and zero-shot transfer positively. The distances are between the "
        f"tasks' trained prompts of the paper's condition (the predictors section's matrices).",
        stats.assign(description=stats.predictor.map(labels), expected_sign=stats.predictor.map(signs)),
        figures.correlation_bars_figure(stats, labels, signs)))
    return out
