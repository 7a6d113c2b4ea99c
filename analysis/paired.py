"""Comparing two sets of prompts scored on the same examples: the paired hierarchical bootstrap and Holm's
adjustment (the conditions section's test, and the SPoT section's per-example matrices).

``paired_bootstrap``: condition A against B on one task. Each resample draws the validation examples once (with
replacement; the same examples for both: they are scored on the same examples) and each side's seeds (with
replacement, independently: the seeds of two conditions are different trainings); the statistic is mean
accuracy(A) - mean accuracy(B) over seeds x examples. Two-sided p = 2 min(share of resamples <= 0, share >= 0), with
the add-one correction; Holm's adjustment over every comparison of one metric is beside it.
"""

from __future__ import annotations

import numpy as np

from analysis import transfer
from analysis.records import PromptRun
from ptray import layout


# ----------------------------------------------------------------------------------------------- statistics
def correctness_matrix(prompts: list[PromptRun], metric: str) -> tuple[np.ndarray, list[int]]:
    """[S, N] 0/1 correctness of each prompt (a row) on the validation examples every one of them was scored on
    (matched by ``idx``, sorted), from the runs' own predictions; ([0, 0], []) without predictions."""
    col = 0 if metric == "exact_match" else 1
    outcomes = [transfer._outcomes(*layout.prediction_lists(p.predictions or {})) for p in prompts]
    if not outcomes or not all(outcomes):
        return np.zeros((0, 0)), []
    common = sorted(set.intersection(*(set(o) for o in outcomes)))
    return np.array([[o[i][col] for i in common] for o in outcomes], dtype=float).reshape(len(prompts),
                                                                                         len(common)), common


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                     block: int = 500) -> dict[str, float]:
    """Condition A against B on the same N examples: ``a`` [S_a, N] and ``b`` [S_b, N] per seed and example.

    Each resample draws N examples with replacement (one draw for both: paired) and S_a, S_b seeds with
    replacement (independently); the statistic is mean(a) - mean(b) over the drawn seeds x examples.

    Returns ``diff`` (the observed difference, in the input's units), ``ci95_low``/``ci95_high`` (percentile
    interval at ``level``) and ``p_boot`` (two-sided: 2 min(#<=0 + 1, #>=0 + 1) / (n_boot + 1), at most 1); NaN
    without data or with ``n_boot`` 0.

    Raises:
        ValueError: the matrices are not 2-D on the same number of examples.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"paired_bootstrap needs [S_a, N] and [S_b, N], got {a.shape} and {b.shape}")
    nan = {"diff": np.nan, "ci95_low": np.nan, "ci95_high": np.nan, "p_boot": np.nan}
    if a.size == 0 or b.size == 0:
        return nan
    diff = float(a.mean() - b.mean())
    if n_boot <= 0:
        return {**nan, "diff": diff}
    rng = np.random.default_rng(seed)
    n_ex = a.shape[1]
    stats = []
    for start in range(0, n_boot, block):
        size = min(block, n_boot - start)
        e = rng.integers(0, n_ex, size=(size, n_ex))
        sa = rng.integers(0, a.shape[0], size=(size, a.shape[0]))
        sb = rng.integers(0, b.shape[0], size=(size, b.shape[0]))
        stats.append(a[sa[:, :, None], e[:, None, :]].mean(axis=(1, 2))
                     - b[sb[:, :, None], e[:, None, :]].mean(axis=(1, 2)))
    d = np.concatenate(stats)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(d, [alpha, 1 - alpha])
    p = min(1.0, 2 * min((np.sum(d <= 0) + 1) / (n_boot + 1), (np.sum(d >= 0) + 1) / (n_boot + 1)))
    return {"diff": diff, "ci95_low": float(lo), "ci95_high": float(hi), "p_boot": float(p)}


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment of p-values (NaN kept as NaN, left out of the count)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[i]))
        out[i] = running
    return out
