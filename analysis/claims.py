"""The paper's claims, checked: one row per claim with the number that tests it, its interval or p-value, and a
reading by a stated rule, gathered from the other sections' results (nothing is computed anew here).

The rule (``reading``): a claim tested by an interval is *supported* when the 95% interval lies on the side the
paper predicts, *contradicted* when it lies on the other side, else *not established*; a claim tested by a p-value
likewise with p < 0.05 and the sign of the statistic; a claim counted over cells (transfer) reports how many
cells' intervals lie on each side and is *supported* when every cell's does, *mixed* when some do, else *not
established*; a claim with no test (how the nearest tokens read, how equal the seed distances are) is
*descriptive*. With 4 tasks a rank correlation over tasks cannot reach p < 0.05 (its smallest p is 0.083), so
such a claim is at best *not established* here, whatever its sign: ``detail`` says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.results import Output, Results, Section

ALPHA = 0.05
SUPPORTED, CONTRADICTED, OPEN, MIXED, DESCRIPTIVE = ("supported", "contradicted", "not established", "mixed",
                                                     "descriptive")
COLUMNS = ["claim", "paper", "measure", "value", "interval_or_p", "reading", "detail"]


def interval_reading(low: float, high: float, sign: str = "+") -> str:
    """``SUPPORTED`` when [low, high] lies strictly on ``sign``'s side of 0, ``CONTRADICTED`` on the other side,
    else ``OPEN`` (also for a NaN bound)."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return OPEN
    above, below = low > 0, high < 0
    if (above and sign == "+") or (below and sign == "-"):
        return SUPPORTED
    return CONTRADICTED if above or below else OPEN


def p_reading(statistic: float, p: float, sign: str) -> str:
    """``SUPPORTED`` / ``CONTRADICTED`` when p < ``ALPHA`` and the statistic has / has not ``sign``, else ``OPEN``."""
    if not (np.isfinite(statistic) and np.isfinite(p)) or p >= ALPHA:
        return OPEN
    return SUPPORTED if (statistic > 0) == (sign == "+") else CONTRADICTED


def count_reading(readings: list[str]) -> str:
    """Every cell ``SUPPORTED``: ``SUPPORTED``; some: ``MIXED``; none: ``OPEN`` (``CONTRADICTED`` if any cell is
    and none supports)."""
    if readings and all(r == SUPPORTED for r in readings):
        return SUPPORTED
    if SUPPORTED in readings:
        return MIXED
    return CONTRADICTED if CONTRADICTED in readings else OPEN


def _row(claim, paper, measure, value, interval, reading, detail="") -> dict:
    return {"claim": claim, "paper": paper, "measure": measure, "value": value, "interval_or_p": interval,
            "reading": reading, "detail": detail}


def _f(v: float, signed: bool = False) -> str:
    return "n/a" if v is None or not np.isfinite(v) else (f"{v:+.3f}" if signed else f"{v:.3f}")


def _records(summary: dict, key: str) -> pd.DataFrame:
    return pd.DataFrame(summary.get(key) or [])


def claims_table(results: Results) -> pd.DataFrame:
    """The claims as rows (``COLUMNS``) from ``results.summary`` (the sections' records) and the within-task
    output; a claim whose numbers the study has not (one task, no transfer runs) is left out."""
    s = results.summary
    rows = []
    transfer = _records(s, "transfer")
    if len(transfer):
        diag = transfer[transfer.source == transfer.target]
        for metric in ("exact_match", "rank_accuracy"):
            for r in diag[diag.metric == metric].itertuples():
                lo, hi = r.ci95_seeds_examples_low, r.ci95_seeds_examples_high
                rows.append(_row(f"{r.source.upper()}'s trained prompts beat no prompt", "6.3 (Figure 8's diagonal)",
                                 f"{metric}: mean over seeds - no prompt", _f(r.delta_mean, True),
                                 f"[{_f(lo, True)}, {_f(hi, True)}]", interval_reading(lo, hi),
                                 f"{r.n_seeds} seeds, {r.n_examples} examples; no prompt {_f(r.baseline)}"))
    nearest = _records(s, "nearest")
    scripts = _records(s, "nearest_scripts")
    for space in ("raw", "effective"):
        sub = nearest[nearest.space == space] if len(nearest) else nearest
        if not len(sub):
            continue
        moved = scripts[scripts.space == space] if len(scripts) else scripts
        init_share = float(moved["top1_is_init_token_init"].mean()) if len(moved) else np.nan
        per_task = ", ".join(f"{t.task} {t.top1_is_init_token:.2f}" for t in sub.itertuples())
        rows.append(_row("prompt rows keep their init token (key words survive)", "6.1, 7",
                         f"share of rows whose nearest token ({space}) is their init token, at the kept epoch",
                         _f(float(sub.top1_is_init_token.mean())), "", DESCRIPTIVE,
                         f"per task {per_task}; at the init {_f(init_share)}"))
        per_task = ", ".join(f"{t.task} {t.rows_other_script:.2f}" for t in sub.itertuples())
        rows.append(_row("rows drift to tokens of other languages", "6.1 (Figures 2-5)",
                         f"share of rows with a top-k neighbour ({space}) in a script the init text does not use",
                         _f(float(sub.rows_other_script.mean())), "", DESCRIPTIVE,
                         f"per task {per_task}; at the init {_f(float(sub.rows_other_script_init.mean()))}; a "
                         "script, not a language: a Latin-script word of another language counts as the same"))
    within = next((o.data for o in results.outputs if o.name == "within_task"), None)
    if isinstance(within, pd.DataFrame) and len(within):
        w = within[(within.measure == "rms_row_distance_raw") & within.cv_ddof1.notna()]
        if len(w):
            rows.append(_row("a task's seeds give nearly equidistant prompts", "6.2 (Figure 6)",
                             "coefficient of variation of the rms row distances between a task's seed pairs (raw)",
                             f"max {_f(float(w.cv_ddof1.max()))}", "", DESCRIPTIVE,
                             ", ".join(f"{r.task} {r.cv_ddof1:.3f}" for r in w.itertuples())))
    clusters = _records(s, "task_clusters")
    for r in clusters.itertuples():
        what = "moves from the init" if "drift" in r.measure else "prompts"
        rows.append(_row(f"a task's {what} cluster apart from other tasks'", "6.2 (Figure 6)",
                         f"silhouette of the task labels ({r.measure})", _f(r.silhouette),
                         f"p = {r.p_permutation:.4g}", p_reading(r.silhouette, r.p_permutation, "+"),
                         f"within / between distance {_f(r.within_between_ratio)}; {r.num_permutations} "
                         "relabellings"))
    spread = _records(s, "spread_correlations")
    if len(spread):
        for against in ("rank_accuracy_delta", "rank_accuracy_median"):
            sub = spread[(spread.spread == "within_rms_row_distance_raw") & (spread.against == against)]
            for r in sub.itertuples():
                rows.append(_row("harder tasks vary more", "6.2 (Tables 1-2), 7",
                                 f"Spearman over tasks: mean seed-pair rms row distance vs {against} "
                                 f"(expected {r.expected_sign})", _f(r.spearman_rho, True),
                                 f"p = {_f(r.p_exact)}", p_reading(r.spearman_rho, r.p_exact, r.expected_sign),
                                 f"{r.n_tasks} tasks; the smallest p these values allow is {_f(r.p_smallest)}"))
    own = _records(s, "transfer_own_task")
    if len(transfer):
        off = transfer[(transfer.source != transfer.target) & ~transfer["held_out"].astype(bool)]
        for metric in ("exact_match", "rank_accuracy"):
            cells = off[off.metric == metric]
            readings = [interval_reading(r.ci95_seeds_examples_low, r.ci95_seeds_examples_high)
                        for r in cells.itertuples()]
            if readings:
                rows.append(_row("prompts transfer zero-shot to other tasks", "6.3 (Figure 8)",
                                 f"{metric}: cells (source != target) whose interval is above 0",
                                 f"{readings.count(SUPPORTED)} of {len(readings)}",
                                 f"{readings.count(CONTRADICTED)} below 0", count_reading(readings),
                                 f"mean change {_f(float(cells.delta_mean.mean()), True)}"))
    for metric in ("exact_match", "rank_accuracy"):
        cells = own[own.metric == metric] if len(own) else own
        if len(cells):
            readings = [interval_reading(r.ci95_low, r.ci95_high) for r in cells.itertuples()]
            rows.append(_row("a prompt gains most on its own task", "6.3",
                             f"{metric}: own-task change - change on another task, pairs above 0",
                             f"{readings.count(SUPPORTED)} of {len(readings)}",
                             f"{readings.count(CONTRADICTED)} below 0",
                             count_reading(readings), "biased towards own: the kept epoch was chosen on own's "
                             "examples"))
    asym = _records(s, "transfer_asymmetry")
    for metric in ("exact_match", "rank_accuracy"):
        cells = asym[asym.metric == metric] if len(asym) else asym
        if len(cells):
            n = sum(interval_reading(r.ci95_low, r.ci95_high) != OPEN for r in cells.itertuples())
            rows.append(_row("transfer is asymmetric (a on b differs from b on a)", "beyond the paper",
                             f"{metric}: task pairs whose difference's interval excludes 0",
                             f"{n} of {len(cells)}", "", DESCRIPTIVE,
                             "no multiplicity adjustment: about 1 in 20 by chance"))
    corr = _records(s, "correlations")
    if len(corr):
        for gain in ("delta_exact_match", "delta_rank_accuracy"):
            sub = corr[(corr.predictor == "frobenius_raw") & (corr.gain == gain)]
            for r in sub.itertuples():
                rows.append(_row("closer prompts transfer better", "6.3 (Figures 7-8)",
                                 f"Spearman over task pairs: Frobenius distance (raw) vs {gain} (expected -)",
                                 _f(r.spearman_rho, True), f"Mantel p = {_f(r.spearman_p_mantel)}",
                                 p_reading(r.spearman_rho, r.spearman_p_mantel, "-"),
                                 f"{r.n_pairs} ordered pairs, {r.mantel_permutations} relabellings"))
    return pd.DataFrame(rows, columns=COLUMNS)


def claims_section(results: Results) -> Section:
    """The claims table as the report's first section after coverage (``claims_table``)."""
    table = claims_table(results)
    out = Section(summary={"claims": table.to_dict(orient="records")})
    if len(table):
        out.outputs.append(Output(
            "claims", "claims", "The paper's claims, checked",
            "One row per claim of the paper (its section in 'paper'), the number that tests it on this study and its "
            "95% interval or p-value, from the sections below. reading: supported / contradicted when the interval "
            "(or p < 0.05 and the statistic's sign) is on the side the paper predicts / the other side, not "
            "established otherwise; counted claims (transfer cells) are supported when every cell is, mixed when "
            "some are; descriptive rows have no test. A rule, not a judgement: read each row with its section.",
            table))
    return out


def side_by_side(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The claims of several studies (name -> ``claims_table``, e.g. read back from each report's ``claims.csv``)
    in one table: ``claim``, ``measure``, then per study one column "value interval (reading)"; rows in the first
    study's order, then those only later ones have; "-" where a study has no such row."""
    keys, cells = [], {}
    for name, t in tables.items():
        for r in t.itertuples():
            key = (r.claim, r.measure)
            if key not in cells:
                keys.append(key)
                cells[key] = {}
            interval = "" if pd.isna(r.interval_or_p) or r.interval_or_p == "" else f" {r.interval_or_p}"
            value = "n/a" if pd.isna(r.value) else r.value
            cells[key][name] = f"{value}{interval} ({r.reading})"
    return pd.DataFrame([{"claim": c, "measure": m, **{n: cells[c, m].get(n, "-") for n in tables}}
                         for c, m in keys], columns=["claim", "measure", *tables])


def main(argv: list[str] | None = None) -> int:
    """``python -m analysis.claims NAME=REPORT_DIR [NAME=REPORT_DIR ...]``: the studies' claims side by side, as a
    Markdown table on stdout (each REPORT_DIR an analysis report folder with its ``claims.csv``)."""
    import sys

    from analysis.report import _md_table

    args = sys.argv[1:] if argv is None else argv
    tables = {}
    for arg in args:
        name, sep, folder = arg.partition("=")
        if not sep or not name or not folder:
            print(f"error: {arg!r}: give each report as NAME=REPORT_DIR, e.g. smollm2=results/smollm2-paper/analysis",
                  file=sys.stderr)
            return 2
        csv = Path(folder) / "claims.csv"
        try:
            table = pd.read_csv(csv, dtype=str, keep_default_na=False)  # the numbers as the report wrote them
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            print(f"error: {name}: cannot read {csv} ({type(err).__name__}); is {folder} an analysis report folder?",
                  file=sys.stderr)
            return 2
        if not set(COLUMNS) <= set(table.columns):
            print(f"error: {name}: {csv} is not a claims table (columns {', '.join(COLUMNS)})", file=sys.stderr)
            return 2
        tables[name] = table
    if not tables:
        print("error: no report given: python -m analysis.claims NAME=REPORT_DIR [NAME=REPORT_DIR ...]",
              file=sys.stderr)
        return 2
    print(_md_table(side_by_side(tables)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
