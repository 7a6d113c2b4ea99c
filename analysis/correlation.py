"""Does distance predict transfer? Correlations between a task-pair predictor (a distance or similarity between
two tasks' prompts) and the transfer gain, over the ordered task pairs (source != target).

The T(T - 1) ordered pairs are not independent observations: with 4 tasks there are 12 pairs, but a symmetric
predictor takes only 6 distinct values (each twice), and every task appears in 6 pairs. The dependence-aware test
is a Mantel test: the predictor's matrix is relabelled by every permutation of the task labels (rows and columns
together, T! of them: 24 for 4 tasks, enumerated exactly), and the p-value is the share of relabellings whose
correlation is at least as extreme (two-sided) as the observed one. Its smallest possible value is 1 / T!
(0.042 for 4 tasks). The naive p-values (scipy's, which treat the pairs as independent) are reported beside it,
labelled as such.

scipy's ``permutation_test`` permutes observations, not the labels of a matrix, so the relabelling is written out
here (``itertools.permutations``); the statistics themselves are scipy's ``spearmanr`` / ``pearsonr``.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pandas as pd
import scipy.stats

from analysis import figures
from analysis.results import Output, Section

# |statistic| within this of the observed one counts as "as extreme": a relabelling that gives the same pairs in
# another order can differ from the observed correlation in the last bits.
_EQUAL = 1e-12


def correlation(x, y) -> dict[str, float]:
    """Naive Spearman and Pearson correlations of paired values (NaN pairs dropped), with scipy's two-sided
    p-values, which assume independent pairs.

    Returns ``n``, ``spearman_rho``, ``spearman_p_naive``, ``pearson_r``, ``pearson_p_naive`` (NaN when fewer than
    3 pairs or a constant side leave the correlation undefined).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    out = {"n": int(x.size), "spearman_rho": np.nan, "spearman_p_naive": np.nan, "pearson_r": np.nan,
           "pearson_p_naive": np.nan}
    if x.size >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = scipy.stats.spearmanr(x, y)
            p = scipy.stats.pearsonr(x, y)
        out.update(spearman_rho=float(s.statistic), spearman_p_naive=float(s.pvalue), pearson_r=float(p.statistic),
                   pearson_p_naive=float(p.pvalue))
    return out


def _off_diagonal_stats(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    off = ~np.eye(x.shape[0], dtype=bool)
    c = correlation(x[off], y[off])
    return c["spearman_rho"], c["pearson_r"]


# Mantel test: every relabelling is enumerated up to 8 tasks (8! = 40320); past that, this many random ones
MANTEL_MAX_EXACT = 40320
MANTEL_RANDOM = 9999


def mantel_test(x, y, max_exact: int = MANTEL_MAX_EXACT, n_random: int = MANTEL_RANDOM, seed: int = 0
                ) -> dict[str, float]:
    """Mantel permutation test of the correlation between the off-diagonal cells of two [T, T] matrices.

    ``x`` (the predictor) is relabelled by permutations p of the T tasks (``x[p][:, p]``) while ``y`` (the
    transfer gain, which need not be symmetric) stays; the statistic is the Spearman (and the Pearson)
    correlation over the T(T - 1) off-diagonal cells, NaN cells dropped. All T! permutations are enumerated when
    T! <= ``max_exact`` (the exact permutation distribution); else the identity plus ``n_random`` random ones
    (seeded by ``seed``). Two-sided p = share of permutations (the identity included) with |statistic| >=
    |observed|.

    Returns ``spearman_rho``, ``spearman_p_mantel``, ``pearson_r``, ``pearson_p_mantel``,
    ``mantel_permutations`` (how many) and ``mantel_exact`` (1.0 if enumerated, else 0.0). Raises ValueError for
    matrices that are not both [T, T].
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.ndim != 2 or x.shape[0] != x.shape[1] or x.shape != y.shape:
        raise ValueError(f"mantel_test needs two [T, T] matrices, got {x.shape} and {y.shape}")
    t = x.shape[0]
    observed = np.array(_off_diagonal_stats(x, y))
    exact = math.factorial(t) <= max_exact
    if exact:
        perms = [list(p) for p in itertools.permutations(range(t))]
    else:
        rng = np.random.default_rng(seed)
        perms = [list(range(t))] + [list(rng.permutation(t)) for _ in range(n_random)]
    null = np.array([_off_diagonal_stats(x[np.ix_(p, p)], y) for p in perms])  # [n_perm, 2]
    with np.errstate(invalid="ignore"):
        extreme = np.abs(null) >= np.abs(observed) - _EQUAL  # NaN compares False: never "as extreme"
    p = np.where(np.isfinite(observed), extreme.mean(axis=0), np.nan)
    return {"spearman_rho": float(observed[0]), "spearman_p_mantel": float(p[0]), "pearson_r": float(observed[1]),
            "pearson_p_mantel": float(p[1]), "mantel_permutations": len(perms), "mantel_exact": float(exact)}


def task_pair_table(predictors: dict[str, pd.DataFrame], gains: dict[str, pd.DataFrame],
                    tasks: list[str]) -> pd.DataFrame:
    """One row per ordered task pair (source != target): source, target, every predictor's value and every gain
    (each a [T, T] DataFrame indexed by source, columns target). Empty, with these columns, for one task."""
    rows = []
    for a in tasks:
        for b in tasks:
            if a != b:
                rows.append({"source": a, "target": b, **{k: float(m.loc[a, b]) for k, m in predictors.items()},
                             **{k: float(m.loc[a, b]) for k, m in gains.items()}})
    return pd.DataFrame(rows, columns=["source", "target", *predictors, *gains])


def correlation_table(predictors: dict[str, pd.DataFrame], gains: dict[str, pd.DataFrame], tasks: list[str],
                      seed: int = 0) -> pd.DataFrame:
    """One row per (predictor, gain): ``n_pairs`` (ordered pairs with both values), the Spearman / Pearson
    correlations with their Mantel p-values (``mantel_test``) first, then the naive p-values
    (``spearman_p_naive``, ``pearson_p_naive``: the pairs taken as independent, too small)."""
    rows = []
    for name, pred in predictors.items():
        x = pred.reindex(index=tasks, columns=tasks).to_numpy(dtype=float)
        for gain, g in gains.items():
            y = g.reindex(index=tasks, columns=tasks).to_numpy(dtype=float)
            off = ~np.eye(len(tasks), dtype=bool)
            naive = correlation(x[off], y[off])
            mantel = mantel_test(x, y, seed=seed)
            rows.append({"predictor": name, "gain": gain, "n_pairs": naive["n"], **mantel,
                         "spearman_p_naive": naive["spearman_p_naive"], "pearson_p_naive": naive["pearson_p_naive"]})
    return pd.DataFrame(rows)


def _fmt(v: float) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3g}"


def correlation_section(*, pairs: pd.DataFrame, stats: pd.DataFrame, tasks: list[str],
                        distance_definition: str) -> Section:
    """The paper's claim (closer prompts transfer better), tested: the Mantel test of the Frobenius distances
    against the transfer gains first, then the scatter of the ordered task pairs. ``pairs`` / ``stats`` come
    from ``task_pair_table`` / ``correlation_table``."""
    from analysis.predictors import PREDICTORS

    main_cols = [c for c in ("frobenius_raw", "frobenius_effective", "rms_row_distance_raw") if c in pairs]
    main = stats[stats.predictor.isin(main_cols)].reset_index(drop=True)
    out = Section(summary={"correlations": stats.to_dict(orient="records")})
    for r in stats.itertuples():
        out.metrics[f"spearman_{r.predictor}_{r.gain}"] = r.spearman_rho
        out.metrics[f"mantel_p_{r.predictor}_{r.gain}"] = r.spearman_p_mantel
    n_perm = int(stats["mantel_permutations"].iloc[0]) if len(stats) else 0
    exact = bool(stats["mantel_exact"].iloc[0]) if len(stats) else True
    defined = [r for r in main.itertuples() if np.isfinite(r.spearman_rho)]
    lead = "; ".join(
        f"{r.predictor} vs {r.gain}: Spearman rho {_fmt(r.spearman_rho)}, Mantel p {_fmt(r.spearman_p_mantel)} "
        f"(naive p {_fmt(r.spearman_p_naive)})" for r in defined) or "no correlation is defined (a constant gain)"
    if len(defined) < len(main):
        lead += " (n/a where every gain or distance is equal)"
    out.outputs.append(Output(
        "correlation_stats", "correlation", "Distance against transfer gain: the dependence-aware test",
        f"Mantel test ({'exact: all' if exact else 'random:'} {n_perm} relabellings of the {len(tasks)} tasks; "
        f"smallest possible p = {1 / max(n_perm, 1):.3g}): {lead}. spearman_p_mantel / pearson_p_mantel are the "
        f"dependence-aware p-values; spearman_p_naive / pearson_p_naive treat the {len(pairs)} ordered pairs as "
        f"independent, but a symmetric distance takes only {len(pairs) // 2} distinct values and every task is in "
        f"{2 * (len(tasks) - 1)} pairs, so they are too small. A negative correlation supports the paper's claim "
        f"(closer prompts transfer better). Length confound: distances are computed {distance_definition}, so "
        f"task pairs compare different numbers of rows (rows_compared in the predictors table); the rms row "
        f"distance removes the sqrt(rows) growth.", main))
    panels = [(col, gain, f"{PREDICTORS[col][0]}\nvs Δ {gain[6:].replace('_', ' ')}",
               stats[(stats.predictor == col) & (stats.gain == gain)].iloc[0].to_dict())
              for gain in ("delta_exact_match", "delta_rank_accuracy")
              for col in ("frobenius_raw", "frobenius_effective") if col in pairs]
    out.outputs.append(Output(
        "correlation", "correlation", "Distance against transfer gain, every task pair",
        f"Each point is an ordered task pair A→B (A ≠ B, n = {len(pairs)}; colour = source A, marker = target B): "
        f"the mean distance between A's and B's prompts (over all seed pairs; the same value for A→B and B→A) "
        f"against the mean accuracy change of A's prompts on B. Panel titles: Spearman rho with its Mantel p and "
        f"naive p, Pearson r.", pairs, figures.scatter_figure(pairs, panels, tasks, ncols=2)))
    return out
