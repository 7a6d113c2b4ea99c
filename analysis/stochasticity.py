"""Stochasticity (paper 5.2): how the prompts of one task's seeds differ. Table 1 (norm and variance per task),
the norms figure, and Figure 6 (every prompt on a 2-D map).

Conventions, also written in the column names: a spread across seeds is the sample standard deviation (ddof=1),
except Table 1's variance, which reproduces the paper's table and is the population variance (ddof=0). The rms row
norm is ||P||_F / sqrt(n), the root mean square of the row norms.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import scipy.stats

from analysis import figures, geometry, paper
from analysis.inputs import Inputs
from analysis.records import PromptRun
from analysis.results import Output, Section

NORM_COLUMNS = ["frobenius_raw", "rms_row_norm_raw", "frobenius_effective", "rms_row_norm_effective", "drift_raw",
                "drift_effective"]


def per_prompt_norms(inputs: Inputs) -> pd.DataFrame:
    """One row per prompt: task, seed, num_tokens and NORM_COLUMNS (norms, and the drift ||P - P_init||_F from
    the task's init-text prompt; NaN where the init prompt or the effective prompt is not defined)."""
    raw_n = geometry.prompt_norms(inputs.raw)
    nan = [np.nan] * len(inputs.prompts)
    eff_n = geometry.prompt_norms(inputs.effective) if inputs.effective is not None else \
        pd.DataFrame({"frobenius": nan, "rms_row_norm": nan})

    def drift(i, p, space):
        init = inputs.init.get(p.task)
        if init is None:
            return np.nan
        if space == "raw":
            return geometry.prompt_distance(p.prompt, init)
        if inputs.effective is None:
            return np.nan
        return geometry.prompt_distance(inputs.effective[i], inputs.init_effective[p.task])

    return pd.DataFrame({
        "task": inputs.labels, "seed": inputs.seeds, "num_tokens": raw_n["num_tokens"],
        "frobenius_raw": raw_n["frobenius"], "rms_row_norm_raw": raw_n["rms_row_norm"],
        "frobenius_effective": eff_n["frobenius"], "rms_row_norm_effective": eff_n["rms_row_norm"],
        "drift_raw": [drift(i, p, "raw") for i, p in enumerate(inputs.prompts)],
        "drift_effective": [drift(i, p, "effective") for i, p in enumerate(inputs.prompts)],
    })


def table1(per_prompt: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    """The paper's Table 1 and its companions: one row per task with num_tokens, num_seeds, and for every
    NORM_COLUMNS column ``<c>_mean`` (over seeds) and ``<c>_var_ddof0`` (population variance across seeds, the
    paper's table; NaN for a task with one seed, where there is no spread across seeds to measure)."""
    g = per_prompt.groupby("task", sort=False)
    out = pd.DataFrame({"task": tasks})
    out["num_tokens"] = [int(g.get_group(t)["num_tokens"].iloc[0]) for t in tasks]
    out["num_seeds"] = [len(g.get_group(t)) for t in tasks]
    for c in NORM_COLUMNS:
        out[f"{c}_mean"] = [g.get_group(t)[c].mean() for t in tasks]
        out[f"{c}_var_ddof0"] = [g.get_group(t)[c].var(ddof=0) if len(g.get_group(t)) > 1 else np.nan
                                 for t in tasks]
    return out


def wsc_cb_ratio(table: pd.DataFrame) -> dict[str, float] | None:
    """WSC / CB ratios of the mean raw norms beside sqrt(n_WSC / n_CB) (what length alone would give) and the
    paper's ratio (``analysis.paper``); None unless the study has both tasks. All unitless."""
    if not {"wsc", "cb"} <= set(table["task"]):
        return None
    r = table.set_index("task")
    return {
        "frobenius_raw_ratio": float(r.loc["wsc", "frobenius_raw_mean"] / r.loc["cb", "frobenius_raw_mean"]),
        "sqrt_length_ratio": float(np.sqrt(r.loc["wsc", "num_tokens"] / r.loc["cb", "num_tokens"])),
        "rms_row_norm_raw_ratio": float(r.loc["wsc", "rms_row_norm_raw_mean"] / r.loc["cb", "rms_row_norm_raw_mean"]),
        "paper_ratio": paper.wsc_cb_norm_ratio(),
    }


# A task's prompt spread across seeds (the rows of ``spread_vs_outcome``) ...
SPREAD_MEASURES = ["frobenius_raw_var_ddof0", "rms_row_norm_raw_var_ddof0", "within_rms_row_distance_raw"]
# ... and what it is set against, with the sign the paper's claim predicts: a larger outcome spread (max - median)
# goes with a larger prompt spread; so does a harder task (a lower median accuracy); and the paper's Table 1
# variance (does this model order the tasks' prompt spread as bloomz-560m did?)
AGAINST = {"rank_accuracy_delta": "+", "exact_match_delta": "+", "rank_accuracy_median": "-",
           "paper_table2_delta": "+", "paper_table2_max_minus_median": "+", "paper_table2_median": "-",
           "paper_table1_var": "+"}


def spread_vs_outcome(per_prompt: pd.DataFrame, prompts: list[PromptRun], rms_row_distance: np.ndarray,
                      tasks: list[str]) -> pd.DataFrame:
    """The paper's "harder tasks vary more" (section 6.2, Tables 1 and 2) as one row per task: how far its seeds'
    prompts spread (``SPREAD_MEASURES``: Table 1's population variance of ||P||_F, the same for the rms row norm,
    and the mean rms row distance between its distinct seed pairs, from ``rms_row_distance`` [P, P] in the order of
    ``prompts``) and how its seeds did: ``<metric>_median``, ``_max`` and ``_delta`` = max - median over seeds of
    each prompt's recorded rank accuracy and exact match (Table 2's definition applied to the seeds), beside the
    paper's Table 1 variance and Table 2 (median, max, the printed delta and max - median; ``analysis.paper``; NaN
    for a task it has not). Spreads are NaN for a task with one seed."""
    rows = []
    for t in tasks:
        own = [i for i, p in enumerate(prompts) if p.task == t]
        pp = per_prompt[per_prompt.task == t]
        several = len(own) > 1
        pairs = [rms_row_distance[i, j] for a, i in enumerate(own) for j in own[a + 1:]]
        row = {"task": t, "num_seeds": len(own),
               "frobenius_raw_var_ddof0": pp["frobenius_raw"].var(ddof=0) if several else np.nan,
               "rms_row_norm_raw_var_ddof0": pp["rms_row_norm_raw"].var(ddof=0) if several else np.nan,
               "within_rms_row_distance_raw": float(np.mean(pairs)) if pairs else np.nan}
        for m in ("rank_accuracy", "exact_match"):
            v = np.array([_number(prompts[i].metrics.get(m)) for i in own], dtype=float)
            v = v[np.isfinite(v)]
            med, top = (float(np.median(v)), float(v.max())) if v.size else (np.nan, np.nan)
            row.update({f"{m}_median": med, f"{m}_max": top, f"{m}_delta": top - med if v.size > 1 else np.nan})
        median, top, printed = paper.TABLE2.get(t, (np.nan,) * 3)
        row.update(paper_table1_var=paper.TABLE1_VARIANCE.get(t, np.nan), paper_table2_median=median,
                   paper_table2_max=top, paper_table2_delta=printed, paper_table2_max_minus_median=top - median)
        rows.append(row)
    return pd.DataFrame(rows)


def _number(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return np.nan


def spearman_exact(x, y) -> dict[str, float]:
    """Spearman's rho of paired values (NaN pairs dropped) with its exact two-sided permutation p-value: y's values
    are paired with x's in every one of the n! orders (n <= 8), and p = 2 * min(share of orders with rho >=
    observed, share with rho <= observed), at most 1 (scipy's ``permutation_test`` convention; tested equal to
    it). ``p_smallest`` is the smallest p any pairing of these values could give: 2/24 = 0.083 for 4 distinct
    values, more with ties (the paper's Table 2 delta ties WSC and RTE). Returns ``n``, ``spearman_rho``,
    ``p_exact``, ``p_smallest`` (NaN for fewer than 3 pairs or a constant side). Raises ValueError above 8 pairs."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    out = {"n": int(x.size), "spearman_rho": np.nan, "p_exact": np.nan, "p_smallest": np.nan}
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    if x.size > 8:
        raise ValueError(f"spearman_exact enumerates n! pairings; {x.size} pairs is too many")
    rx, ry = scipy.stats.rankdata(x), scipy.stats.rankdata(y)  # Spearman's rho: Pearson's r of the ranks
    rx, ry = rx - rx.mean(), ry - ry.mean()
    rx, ry = rx / np.linalg.norm(rx), ry / np.linalg.norm(ry)
    null = ry[np.array(list(itertools.permutations(range(x.size))))] @ rx  # [n!], the identity first

    def p_of(r: float) -> float:
        tol = 1e-12 * max(1.0, abs(r))
        return min(1.0, 2 * min(np.mean(null >= r - tol), np.mean(null <= r + tol)))

    out.update(spearman_rho=float(null[0]), p_exact=float(p_of(null[0])),
               p_smallest=float(min(p_of(r) for r in np.unique(np.round(null, 12)))))
    return out


def spread_correlations(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (spread, against) of ``SPREAD_MEASURES`` x ``AGAINST`` over the tasks of ``spread_vs_outcome``:
    ``expected_sign`` (what the paper's claim predicts), ``n_tasks`` with both values, ``spearman_rho``,
    ``p_exact`` and ``p_smallest`` (``spearman_exact``)."""
    rows = []
    for sp in SPREAD_MEASURES:
        for against, sign in AGAINST.items():
            r = spearman_exact(table[sp], table[against])
            rows.append({"spread": sp, "against": against, "expected_sign": sign, "n_tasks": r["n"],
                         "spearman_rho": r["spearman_rho"], "p_exact": r["p_exact"], "p_smallest": r["p_smallest"]})
    return pd.DataFrame(rows)


def _norms_figure(per_prompt: pd.DataFrame, tasks: list[str], effective: bool):
    means = per_prompt.groupby("task", sort=False)[NORM_COLUMNS].agg(["mean", "std"])  # pandas std: ddof=1
    means.columns = [f"{a}_{b}" for a, b in means.columns]
    means = means.reindex(tasks).reset_index()
    panels = []
    for col, title, ylabel in (("frobenius", "Frobenius norm per prompt (paper's Table 1)", "||P||_F"),
                               ("rms_row_norm", "RMS row norm ||P||_F / sqrt(n)", "norm per row")):
        series = [(f"{col}_raw_mean", "raw")] + ([(f"{col}_effective_mean", "effective")] if effective else [])
        panels.append({"data": means, "category": "task", "title": title, "ylabel": ylabel, "series": series,
                       "errors": {s: s.replace("_mean", "_std") for s, _ in series},
                       "dots": per_prompt.rename(columns={s.removesuffix("_mean"): s for s, _ in series})})
    return figures.bars_figure(panels)


ZERO_SPREAD = "zero spread: every prompt at one point (all coincide)"


def _maps(inputs: Inputs, distances: dict[str, np.ndarray], distance: str, seed: int
          ) -> tuple[pd.DataFrame, list, float | None]:
    """Figure 6's maps: t-SNE (3 or more distinct prompts) and PCA (2 or more prompts) per space;
    ``(coords, maps, perplexity of the raw t-SNE map or None)``, ``maps`` empty for a single prompt. Coinciding
    prompts share one point in every map; a map of zero spread says so in its axis note."""
    coords = pd.DataFrame({"task": inputs.labels, "seed": inputs.seeds})
    maps = []
    spaces = [("raw", inputs.raw)] + ([("effective", inputs.effective)] if inputs.effective is not None else [])
    perplexity = None
    if len(inputs.prompts) < 2:  # one point has no map (PCA of one sample divides by zero)
        return coords, maps, perplexity
    for space, mats in spaces:
        matrix = distances[f"frobenius_{space}"]
        distinct = int(geometry.coinciding(matrix).max()) + 1
        if len(mats) >= 3 and distinct != 2:
            xy = geometry.tsne_map(matrix, seed=seed)
            coords[f"tsne_{space}_x"], coords[f"tsne_{space}_y"] = xy[:, 0], xy[:, 1]
            if distinct == 1:
                note = ZERO_SPREAD
            else:
                used = geometry.tsne_perplexity(distinct)
                perplexity = used if space == "raw" else perplexity
                note = f"perplexity {used:g}, Frobenius distances ({distance})"
            maps.append((f"t-SNE, {space} prompts", xy, note))
        feats, m = geometry.common_length_features(mats)
        xy, ratio = geometry.pca_map(feats)
        coords[f"pca_{space}_x"], coords[f"pca_{space}_y"] = xy[:, 0], xy[:, 1]
        maps.append((f"PCA, {space} prompts", xy, f"first {m} rows flattened; " + (
            f"PC1 {ratio[0]:.0%}, PC2 {ratio[1]:.0%} of variance" if ratio.sum() > 0 else ZERO_SPREAD)))
    return coords, maps, perplexity


def _coincidence_note(inputs: Inputs, distances: dict[str, np.ndarray]) -> str | None:
    """One line for the report when prompts coincide (distance 0 and equal distances to every other prompt)."""
    groups = geometry.coinciding(distances["frobenius_raw"])
    n, distinct = len(groups), int(groups.max()) + 1 if len(groups) else 0
    if distinct == n:
        return None
    if distinct == 1:
        return (f"the maps (Figure 6) have zero spread: all {n} prompts coincide (every distance between them is 0; "
                f"e.g. training left each at its init), so every map puts them on one point")
    shared = [", ".join(f"{inputs.labels[i]} seed {inputs.seeds[i]}" for i in np.flatnonzero(groups == g))
              for g in range(distinct) if (groups == g).sum() > 1]
    return (f"{n - distinct + len(shared)} of the {n} prompts coincide with another (distance 0) and share one point "
            f"in every map: {'; '.join(shared)}" + (f"; t-SNE not computed: it needs 3 distinct prompts, the study "
                                                   f"has {distinct}" if distinct == 2 and n >= 3 else ""))


def stochasticity_section(*, inputs: Inputs, distances: dict[str, np.ndarray], distance: str, seed: int) -> Section:
    """Table 1, the norms figure and Figure 6 (t-SNE and PCA maps). t-SNE runs on ``distances["frobenius_raw"]``
    (and ``"frobenius_effective"``), the [P, P] matrices of ``analysis.distances.distance_matrices``, computed
    with ``distance``; ``seed`` seeds t-SNE."""
    per_prompt = per_prompt_norms(inputs)
    t1 = table1(per_prompt, inputs.tasks)
    ratio = wsc_cb_ratio(t1)
    eff = inputs.effective is not None
    out = Section(summary={"table1": t1.to_dict(orient="records"), "wsc_cb_norm_ratio": ratio})
    eff_text = f"the output of {inputs.effective_name}" if eff else \
        "n/a: the effective prompt is not defined for this model"
    out.outputs.append(Output(
        "table1_norms", "stochasticity", "Table 1: norm and variance of the prompts per task",
        "Per task: mean over seeds (_mean) and population variance across seeds (_var_ddof0, the convention of the "
        "paper's Table 1) of the Frobenius norm ||P||_F (the paper's number, which grows with the prompt's length "
        "n), the rms row norm ||P||_F / sqrt(n) (root mean square of the row norms, comparable across lengths), "
        f"the same for the effective rows ({eff_text}), and the drift ||P - P_init||_F from the init-text prompt."
        + (f" WSC/CB raw norm ratio {ratio['frobenius_raw_ratio']:.3f} against sqrt(n_WSC/n_CB) = "
           f"{ratio['sqrt_length_ratio']:.3f} (the length confound; paper: {ratio['paper_ratio']:.3f}); rms row "
           f"norm ratio {ratio['rms_row_norm_raw_ratio']:.3f}." if ratio else ""), t1))
    out.outputs.append(Output(
        "norms", "stochasticity", "Prompt norms, raw and effective",
        "Bars: mean over seeds; error bars: sample standard deviation across seeds (ddof=1); dots: seeds. The raw "
        "Frobenius norm grows with the number of rows; the rms row norm and the effective rows compare across "
        "tasks." + ("" if eff else " Effective: n/a for this model."), per_prompt,
        _norms_figure(per_prompt, inputs.tasks, eff)))
    spread = spread_vs_outcome(per_prompt, inputs.prompts, distances["rms_row_distance_raw"], inputs.tasks)
    corr = spread_correlations(spread)
    out.summary.update(spread_vs_outcome=spread.to_dict(orient="records"),
                       spread_correlations=corr.to_dict(orient="records"))
    out.outputs.append(Output(
        "spread_vs_outcome", "stochasticity", "Do harder tasks vary more? Prompt spread against outcome spread",
        "Per task, how far its seeds' prompts spread: Table 1's population variance of ||P||_F (it grows with the "
        "prompt's length, so it compares tasks of different lengths poorly), the same for the rms row norm, and "
        "the mean rms row distance between its seed pairs (Figure 6's spread, comparable across lengths); and how "
        "its seeds did: the median, the maximum and delta = max - median of the seeds' rank accuracy and exact "
        "match at their kept epochs (the definition of the paper's Table 2, here over this study's seeds; a lower "
        "median is a harder task), beside the paper's Table 1 variance and its Table 2 (bloomz-560m's reported "
        "median and maximum accuracy, Muennighoff et al. 2023; paper_table2_delta as printed, which for CB (0.08) "
        "is not its max - median (0.18): both are kept). NaN: one seed, or a task the paper has not.", spread))
    out.outputs.append(Output(
        "spread_correlations", "stochasticity", "Rank correlations of prompt spread and outcome spread over tasks",
        "Spearman's rho over the tasks between each prompt-spread measure and each column it is set against, the "
        "sign the paper's claim predicts (expected_sign: + for an outcome spread and the paper's Table 1 variance, "
        "- for a median accuracy, since a harder task has a lower one), and its exact two-sided permutation "
        "p-value (every pairing of the tasks' values enumerated). p_smallest is the smallest p these values "
        "could give in any order: with 4 tasks 0.083 at best, more with ties, so the claim can at most be "
        "consistent with an ordering of 4 points, never established by it. NaN: fewer than 3 tasks or a constant "
        "side.", corr))
    one_seed = [t for t, n in zip(t1["task"], t1["num_seeds"]) if n < 2]
    if one_seed:
        out.notes.append(f"variance and spread across seeds: n/a for {', '.join(one_seed)} (one seed)")
    coords, maps, perplexity = _maps(inputs, distances, distance, seed)
    n = len(inputs.prompts)
    if n < 3:
        out.notes.append(f"t-SNE map (Figure 6) not computed: it needs 3 or more prompts, the study has {n}"
                         + ("; PCA map not computed either: it needs 2" if n < 2 else ""))
    coincide = _coincidence_note(inputs, distances) if n >= 2 else None
    if coincide:
        out.notes.append(coincide)
    if not maps:
        return out
    distinct = int(geometry.coinciding(distances["frobenius_raw"]).max()) + 1
    if perplexity is not None:
        tsne = (f"t-SNE (perplexity {perplexity:g}, valid for {distinct} distinct points, seed {seed}) runs on the "
                f"prompt distance matrix, so prompts of different lengths are compared as in the distance section; ")
    elif distinct == 1 and n >= 3:
        tsne = "t-SNE and PCA: zero spread, every prompt at one point (all coincide). "
    else:
        tsne = f"t-SNE: n/a ({distinct} distinct prompts; it needs 3). "
    out.outputs.append(Output(
        "prompt_maps", "stochasticity", "Figure 6: every prompt in two dimensions",
        "Each point is one prompt, coloured by task, the seeds of a task joined; coinciding prompts share a point. "
        + tsne + "PCA needs equal-length vectors and uses "
        "the first rows common to all prompts. t-SNE distances between clusters are not meaningful; PCA's are. "
        "Top: raw rows (the paper)" + ("; bottom: effective rows." if eff else "."), coords,
        figures.prompt_maps_figure(maps, inputs.labels, inputs.seeds, inputs.tasks), show_table=False))
    return out
