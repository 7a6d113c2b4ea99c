"""Zero-shot transfer (paper 5.3, Figure 8): accuracy change of task A's prompts on task B over B's no-prompt run.

For source A, target B and metric (exact match or rank accuracy): every seed s of A gives
``delta_s = acc(A_s on B) - acc(no prompt on B)``; the table reports the mean and standard deviation (ddof=1) of
delta over A's seeds and a 95% percentile bootstrap interval of the mean over B's validation examples (examples
resampled with replacement, the same resample for every seed and the baseline, A's seeds held fixed). CB has 56
validation examples, so one example moves an accuracy by 1.8 points: the intervals show it.

The diagonal (A on A) comes from ``transfer`` runs when the study has them, else from the train runs' own
predictions on the validation split. Examples are matched by ``idx``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from analysis.records import Study

METRICS = {"exact_match": "em_correct", "rank_accuracy": "rank_correct"}


def _outcomes(idx, em, rank) -> dict[int, tuple[int, int]]:
    return {int(i): (int(e), int(r)) for i, e, r in zip(idx, em, rank)}


def collect(study: Study) -> tuple[dict, dict]:
    """Per-example outcomes from the study's runs.

    Returns ``(cells, baselines)``: ``cells[(source, seed, target)]`` and ``baselines[target]`` are dicts with
    ``outcomes`` ({idx: (em, rank)}, empty when the run has no predictions), ``metrics`` (exact_match,
    rank_accuracy as recorded) and ``origin`` (the run it came from). Later runs replace earlier ones for the same
    cell (a re-run study keeps its newest result).
    """
    cells: dict = {}
    baselines: dict = {}
    for p in sorted(study.prompts, key=lambda p: p.seed, reverse=True):  # lowest seed wins the baseline fallback
        pred = p.predictions or {}
        cells[(p.task, p.seed, p.task)] = {
            "outcomes": _outcomes(pred.get("idx", []), pred.get("prompt_em_correct", []),
                                  pred.get("prompt_rank_correct", [])),
            "metrics": {m: p.metrics.get(m) for m in METRICS}, "origin": f"train run {p.run_id}",
        }
        baselines[p.task] = {
            "outcomes": _outcomes(pred.get("idx", []), pred.get("no_prompt_em_correct", []),
                                  pred.get("no_prompt_rank_correct", [])),
            "metrics": {m: p.metrics.get(f"no_prompt_{m}") for m in METRICS}, "origin": f"train run {p.run_id}",
        }
    for e in study.evals:
        entry = {"outcomes": _outcomes(e.idx, e.em_correct, e.rank_correct),
                 "metrics": {m: e.metrics.get(m) for m in METRICS}, "origin": f"{e.kind} run {e.run_id}"}
        if e.kind == "baseline":
            baselines[e.target] = entry
        elif e.kind == "transfer" and e.source is not None and e.source_seed is not None:
            cells[(e.source, int(e.source_seed), e.target)] = entry
    return cells, baselines


def bootstrap_mean_ci(per_example: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                      block: int = 500) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``per_example`` [N] (examples resampled with replacement)."""
    x = np.asarray(per_example, dtype=np.float64)
    if x.size == 0 or n_boot <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = np.concatenate([x[rng.integers(0, x.size, size=(min(block, n_boot - s), x.size))].mean(axis=1)
                            for s in range(0, n_boot, block)])
    alpha = (1 - level) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return float(lo), float(hi)


def transfer_tables(study: Study, n_boot: int = 2000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per_seed, summary) DataFrames.

    per_seed: one row per (source, seed, target, metric) with accuracy, baseline, delta, n_examples, origin.
    summary: one row per (source, target, metric) with n_seeds, n_examples, baseline, accuracy_mean, delta_mean,
    delta_std (ddof=1 over seeds), ci_low / ci_high (95% bootstrap of delta_mean over target examples).
    """
    cells, baselines = collect(study)
    tasks = study.tasks
    per_seed, summary = [], []
    for source in tasks:
        seeds = sorted({p.seed for p in study.prompts if p.task == source})
        for target in tasks:
            base = baselines.get(target)
            for metric in METRICS:
                col = 0 if metric == "exact_match" else 1
                deltas, matrix, origins, n_common = [], [], [], None
                base_acc = np.nan
                for s in seeds:
                    cell = cells.get((source, s, target))
                    if cell is None or base is None:
                        continue
                    common = sorted(set(cell["outcomes"]) & set(base["outcomes"]))
                    if common:
                        acc_vec = np.array([cell["outcomes"][i][col] for i in common], dtype=float)
                        base_vec = np.array([base["outcomes"][i][col] for i in common], dtype=float)
                        acc, base_acc = acc_vec.mean(), base_vec.mean()
                        if n_common is None or len(common) == n_common:
                            matrix.append(acc_vec - base_vec)
                        n_common = len(common)
                    else:  # no per-example predictions: the recorded metrics, without an interval
                        acc, base_acc = cell["metrics"][metric], base["metrics"][metric]
                        if acc is None or base_acc is None:
                            continue
                    deltas.append(acc - base_acc)
                    origins.append(cell["origin"])
                    per_seed.append({"source": source, "seed": s, "target": target, "metric": metric,
                                     "accuracy": float(acc), "baseline": float(base_acc),
                                     "delta": float(acc - base_acc), "n_examples": len(common) or None,
                                     "origin": cell["origin"], "baseline_origin": base["origin"]})
                if not deltas:
                    continue
                ok_ci = len(matrix) == len(deltas) and matrix
                lo, hi = bootstrap_mean_ci(np.mean(matrix, axis=0), n_boot, seed=seed) if ok_ci else (np.nan,) * 2
                summary.append({
                    "source": source, "target": target, "metric": metric, "n_seeds": len(deltas),
                    "n_examples": n_common, "baseline": float(base_acc),
                    # rounded: accuracies are ratios of small integers, so 1e-17 is float noise, not a change
                    "accuracy_mean": round(float(np.mean(deltas) + base_acc), 12),
                    "delta_mean": round(float(np.mean(deltas)), 12),
                    "delta_std": float(np.std(deltas, ddof=1)) if len(deltas) > 1 else float("nan"),
                    "ci_low": lo, "ci_high": hi,
                    "from": "transfer runs" if all(o.startswith("transfer") for o in origins)
                    else "train runs" if all(o.startswith("train") for o in origins) else "mixed",
                })
    return pd.DataFrame(per_seed), pd.DataFrame(summary)


def summary_matrix(summary: pd.DataFrame, metric: str, value: str, tasks: list[str]) -> pd.DataFrame:
    """One column of the summary as a [source, target] matrix in ``tasks`` order (NaN where missing)."""
    sub = summary[summary["metric"] == metric]
    mat = sub.pivot(index="source", columns="target", values=value) if len(sub) else pd.DataFrame()
    return mat.reindex(index=tasks, columns=tasks).astype(float).rename_axis(index="source", columns="target")


def correlation(x, y) -> dict[str, float]:
    """Spearman and Pearson correlation (with two-sided p-values) of paired values, NaN pairs dropped."""
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    out = {"n": int(x.size), "spearman_r": np.nan, "spearman_p": np.nan, "pearson_r": np.nan, "pearson_p": np.nan}
    if x.size >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = stats.spearmanr(x, y)
            p = stats.pearsonr(x, y)
        out.update(spearman_r=float(s.statistic), spearman_p=float(s.pvalue), pearson_r=float(p.statistic),
                   pearson_p=float(p.pvalue))
    return out
