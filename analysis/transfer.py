"""Zero-shot transfer (paper 5.3, Figure 8): accuracy change of task A's prompts on task B over B's no-prompt run.

For source A, target B and metric (exact match or rank accuracy): every seed s of A gives
``delta_s = acc(A_s on B) - acc(no prompt on B)``. The table reports, per cell:

- ``delta_mean``: the mean of delta over A's seeds; ``delta_sd_ddof1``: their sample standard deviation (ddof=1),
  the seed spread;
- ``ci95_examples_low/high``: a 95% percentile bootstrap interval of delta_mean over B's validation examples
  (examples resampled with replacement, A's seeds held fixed): the uncertainty from the finite evaluation set only;
- ``ci95_seeds_examples_low/high``: a hierarchical bootstrap that resamples A's seeds and B's examples together
  (seeds with replacement, then examples with replacement, the same examples for every drawn seed since all seeds
  are scored on the same examples): both sources of uncertainty. Figure 8 shows this one.

A cell whose seeds disagree can have a narrow examples-only interval and a wide hierarchical one, and the reverse.
CB has 56 validation examples, so one example moves an accuracy by 1.8 points: the intervals show it.

The diagonal (A on A) comes from ``transfer`` runs when the study has them, else from the train runs' own
predictions on the validation split. Examples are matched by ``idx``.

Transfer-only targets (tasks evaluated in the transfer grid without train runs: ``Study.transfer_only_targets``)
are held-out columns: every source's prompts on them, against their no-prompt run; they have no diagonal and no
prompt of their own, so they are never a source (row) and the distance-vs-transfer tests, which pair a target's
prompts with a source's, leave them out (``summary_matrix`` with the trained tasks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis import figures
from analysis.records import Study
from analysis.results import Output, Section
from ptray import layout

METRICS = {"exact_match": layout.EM_CORRECT, "rank_accuracy": layout.RANK_CORRECT}


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
            "outcomes": _outcomes(*layout.prediction_lists(pred)),
            "metrics": {m: p.metrics.get(m) for m in METRICS}, "origin": f"train run {p.run_id}",
        }
        baselines[p.task] = {
            "outcomes": _outcomes(*layout.prediction_lists(pred, baseline="no_prompt")),
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
    """Percentile bootstrap interval of the mean of ``per_example`` [N] (examples resampled with replacement),
    in the input's units; (nan, nan) for no data or ``n_boot`` 0."""
    x = np.asarray(per_example, dtype=np.float64)
    if x.size == 0 or n_boot <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = np.concatenate([x[rng.integers(0, x.size, size=(min(block, n_boot - s), x.size))].mean(axis=1)
                            for s in range(0, n_boot, block)])
    alpha = (1 - level) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return float(lo), float(hi)


def hierarchical_bootstrap_means(per_seed_example: np.ndarray, n_boot: int = 2000, seed: int = 0, block: int = 500,
                                 seed_draws: np.ndarray | None = None) -> np.ndarray:
    """[n_boot] resampled means of ``per_seed_example`` [S seeds, N examples]: each resample draws S seeds with
    replacement and N examples with replacement (one draw of examples shared by the drawn seeds, as every seed is
    scored on the same examples) and takes the mean of that [S, N] block. ``seed_draws`` [n_boot, S]: the seed
    indices to use instead of drawing them, so that two cells of one source's seeds resample the same seeds.
    Raises ValueError for an input that is not 2-D."""
    x = np.asarray(per_seed_example, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"per_seed_example must be [seeds, examples], got shape {x.shape}")
    n_seeds, n_ex = x.shape
    rng = np.random.default_rng(seed)
    stats = []
    for start in range(0, n_boot, block):
        b = min(block, n_boot - start)
        s_idx = rng.integers(0, n_seeds, size=(b, n_seeds)) if seed_draws is None else seed_draws[start:start + b]
        e_idx = rng.integers(0, n_ex, size=(b, n_ex))
        stats.append(x[s_idx[:, :, None], e_idx[:, None, :]].mean(axis=(1, 2)))
    return np.concatenate(stats) if stats else np.array([])


def hierarchical_bootstrap_ci(per_seed_example: np.ndarray, n_boot: int = 2000, level: float = 0.95,
                              seed: int = 0, block: int = 500) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``per_seed_example`` [S seeds, N examples], resampling seeds
    and examples together (``hierarchical_bootstrap_means``). Units: those of the input (an accuracy change).
    (nan, nan) for no data or ``n_boot`` 0; raises ValueError for an input that is not 2-D.
    """
    x = np.asarray(per_seed_example, dtype=np.float64)
    if x.ndim == 2 and (x.size == 0 or n_boot <= 0):
        return float("nan"), float("nan")
    return _percentile(hierarchical_bootstrap_means(x, n_boot, seed=seed, block=block), level)


def _percentile(draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    alpha = (1 - level) / 2
    lo, hi = np.quantile(draws, [alpha, 1 - alpha])
    return float(lo), float(hi)


@dataclass
class Cell:
    """One (source, target, metric) cell of the grid: per source seed its accuracy and change over no prompt, and
    ``matrix`` [seeds, examples] of per-example changes (correct minus the baseline's correct, on the examples
    ``idx`` both were scored on; None where a seed has no per-example predictions or other examples)."""

    seeds: list[int] = field(default_factory=list)
    deltas: list[float] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)  # the per-seed table's rows
    matrix: np.ndarray | None = None
    idx: list[int] | None = None
    correct: float = 0.0  # right answers summed over the matrix's seeds x examples
    base_acc: float = float("nan")
    n_common: int | None = None


def _cell(cells: dict, base: dict | None, source: str, seeds: list[int], target: str, metric: str) -> Cell:
    col = 0 if metric == "exact_match" else 1
    out, rows_of_matrix, ok = Cell(), [], True
    for s in seeds:
        cell = cells.get((source, s, target))
        if cell is None or base is None:
            continue
        common = sorted(set(cell["outcomes"]) & set(base["outcomes"]))
        if common:
            acc_vec = np.array([cell["outcomes"][i][col] for i in common], dtype=float)
            base_vec = np.array([base["outcomes"][i][col] for i in common], dtype=float)
            acc, out.base_acc = acc_vec.mean(), base_vec.mean()
            if not rows_of_matrix or common == out.idx:  # the rows of the matrix are the same examples
                rows_of_matrix.append(acc_vec - base_vec)
                out.correct += acc_vec.sum()
                out.idx = common
            else:
                ok = False
            out.n_common = len(common)
        else:  # no per-example predictions: the recorded metrics, without an interval
            acc, base_acc = cell["metrics"].get(metric), base["metrics"].get(metric)
            if acc is None or base_acc is None:  # nothing to compare: this seed is left out of the cell
                continue
            out.base_acc = base_acc
            ok = False
        out.seeds.append(s)
        out.deltas.append(acc - out.base_acc)
        out.rows.append({"source": source, "seed": s, "target": target, "metric": metric, "accuracy": float(acc),
                         "baseline": float(out.base_acc), "delta": float(acc - out.base_acc),
                         "n_examples": len(common) or None, "origin": cell["origin"],
                         "baseline_origin": base["origin"]})
    if ok and rows_of_matrix and len(rows_of_matrix) == len(out.deltas):
        out.matrix = np.stack(rows_of_matrix)
    return out


def delta_cells(study: Study) -> dict[tuple[str, str, str], Cell]:
    """Every (source, target, metric) cell of the grid with at least one seed (``Cell``): trained tasks as
    sources, trained and transfer-only tasks as targets."""
    cells, baselines = collect(study)
    out = {}
    for source in study.tasks:
        seeds = sorted({p.seed for p in study.prompts if p.task == source})
        for target in study.tasks + study.transfer_only_targets:
            for metric in METRICS:
                c = _cell(cells, baselines.get(target), source, seeds, target, metric)
                if c.deltas:
                    out[source, target, metric] = c
    return out


def transfer_tables(study: Study, n_boot: int = 2000, seed: int = 0,
                    cells: dict[tuple[str, str, str], Cell] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per_seed, summary) DataFrames (from ``cells``, default ``delta_cells(study)``).

    per_seed: one row per (source, seed, target, metric) with accuracy, baseline, delta, n_examples, origin.
    summary: one row per (source, target, metric) with n_seeds, n_examples, baseline, accuracy_mean, delta_mean,
    delta_sd_ddof1 (over seeds), ci95_examples_low/high and ci95_seeds_examples_low/high (see the module
    docstring; NaN without per-example predictions). Accuracies and deltas are fractions (0-1).
    """
    held_out = study.transfer_only_targets
    per_seed, summary = [], []
    for (source, target, metric), c in (delta_cells(study) if cells is None else cells).items():
        per_seed += c.rows
        m = c.matrix
        lo, hi = bootstrap_mean_ci(m.mean(axis=0), n_boot, seed=seed) if m is not None else (np.nan,) * 2
        h_lo, h_hi = hierarchical_bootstrap_ci(m, n_boot, seed=seed) if m is not None else (np.nan,) * 2
        delta_mean = _mean(c)
        accuracy_mean = float(c.correct) / m.size if m is not None else delta_mean + float(c.base_acc)
        origins = [r["origin"] for r in c.rows]
        summary.append({
            "source": source, "target": target, "held_out": target in held_out, "metric": metric,
            "n_seeds": len(c.deltas), "n_examples": c.n_common, "baseline": float(c.base_acc),
            "accuracy_mean": accuracy_mean, "delta_mean": delta_mean,
            "delta_sd_ddof1": float(np.std(c.deltas, ddof=1)) if len(c.deltas) > 1 else float("nan"),
            "ci95_examples_low": lo, "ci95_examples_high": hi,
            "ci95_seeds_examples_low": h_lo, "ci95_seeds_examples_high": h_hi,
            "from": "transfer runs" if all(o.startswith("transfer") for o in origins)
            else "train runs" if all(o.startswith("train") for o in origins) else "mixed",
        })
    return pd.DataFrame(per_seed), pd.DataFrame(summary)


def _mean(c: Cell) -> float:
    """The cell's mean change. With a per-example matrix: an integer count over seeds x examples divided once, so
    equal ratios give identical floats (IEEE division rounds the exact ratio) and a rank statistic sees equal
    changes as ties; else the mean of the recorded per-seed changes."""
    return float(c.matrix.sum()) / c.matrix.size if c.matrix is not None else float(np.mean(c.deltas))


def asymmetry_table(cells: dict[tuple[str, str, str], Cell], tasks: list[str], n_boot: int = 2000,
                    seed: int = 0) -> pd.DataFrame:
    """Is transfer symmetric? One row per unordered pair of trained tasks (a before b in ``tasks``) and metric:
    ``delta_ab`` (a's prompts on b over b's no prompt), ``delta_ba``, ``difference`` = delta_ab - delta_ba, and its
    95% percentile interval ``ci95_low/high``: the two cells' hierarchical bootstraps (``hierarchical_bootstrap_
    means``) drawn independently, as they share neither prompts nor examples, and subtracted draw by draw. NaN
    interval where a cell has no per-example matrix. Fractions (0-1)."""
    rows = []
    for i, a in enumerate(tasks):
        for b in tasks[i + 1:]:
            for metric in METRICS:
                ab, ba = cells.get((a, b, metric)), cells.get((b, a, metric))
                if ab is None or ba is None:
                    continue
                lo = hi = np.nan
                if ab.matrix is not None and ba.matrix is not None and n_boot > 0:
                    lo, hi = _percentile(hierarchical_bootstrap_means(ab.matrix, n_boot, seed=seed)
                                         - hierarchical_bootstrap_means(ba.matrix, n_boot, seed=seed + 1))
                rows.append({"task_a": a, "task_b": b, "metric": metric, "delta_ab": _mean(ab), "delta_ba": _mean(ba),
                             "difference": _mean(ab) - _mean(ba), "ci95_low": lo, "ci95_high": hi})
    return pd.DataFrame(rows, columns=["task_a", "task_b", "metric", "delta_ab", "delta_ba", "difference", "ci95_low",
                                       "ci95_high"])


def own_task_table(cells: dict[tuple[str, str, str], Cell], tasks: list[str], n_boot: int = 2000,
                   seed: int = 0) -> pd.DataFrame:
    """Is a prompt's gain largest on its own task (the paper: "the largest performance gain is when the CB
    soft-prompt is used on the CB validation split")? One row per source, other trained target and metric:
    ``own`` (delta source on source), ``other`` (delta source on target), ``own_minus_other`` and its 95%
    percentile interval ``ci95_low/high``: both cells resample the same draws of the source's seeds (the same
    prompts score both) and each its own examples. NaN interval where a cell has no per-example matrix or the
    two cells have other seeds. Fractions (0-1)."""
    rows = []
    for a in tasks:
        for b in tasks:
            for metric in METRICS:
                own, other = cells.get((a, a, metric)), cells.get((a, b, metric))
                if a == b or own is None or other is None:
                    continue
                lo = hi = np.nan
                if own.matrix is not None and other.matrix is not None and own.seeds == other.seeds and n_boot > 0:
                    draws = np.random.default_rng(seed).integers(0, len(own.seeds), size=(n_boot, len(own.seeds)))
                    lo, hi = _percentile(
                        hierarchical_bootstrap_means(own.matrix, n_boot, seed=seed + 1, seed_draws=draws)
                        - hierarchical_bootstrap_means(other.matrix, n_boot, seed=seed + 2, seed_draws=draws))
                rows.append({"source": a, "target": b, "metric": metric, "own": _mean(own), "other": _mean(other),
                             "own_minus_other": _mean(own) - _mean(other), "ci95_low": lo, "ci95_high": hi})
    return pd.DataFrame(rows, columns=["source", "target", "metric", "own", "other", "own_minus_other", "ci95_low",
                                       "ci95_high"])


def summary_matrix(summary: pd.DataFrame, metric: str, value: str, tasks: list[str],
                   targets: list[str] | None = None) -> pd.DataFrame:
    """One column of the summary as a [source, target] matrix in ``tasks`` order (NaN where missing); columns
    ``targets`` (default: ``tasks``, the square matrix of trained tasks; held-out targets are columns only)."""
    sub = summary[summary["metric"] == metric]
    mat = sub.pivot(index="source", columns="target", values=value) if len(sub) else pd.DataFrame()
    return mat.reindex(index=tasks, columns=targets if targets is not None else tasks).astype(float).rename_axis(
        index="source", columns="target")


def transfer_section(*, study: Study, tasks: list[str], n_boot: int, seed: int) -> tuple[Section, pd.DataFrame]:
    """Figure 8 and the per-seed table; returns ``(section, summary)`` with ``summary`` from ``transfer_tables``
    (empty when the study has no transfer results)."""
    cells = delta_cells(study)
    per_seed, summary = transfer_tables(study, n_boot, seed, cells)
    held_out = [t for t in study.transfer_only_targets if len(summary) and t in set(summary["target"])]
    targets = tasks + held_out
    out = Section(summary={"transfer": summary.to_dict(orient="records"), "transfer_held_out_targets": held_out})
    if summary.empty:
        out.notes.append("no transfer results: the study has no transfer runs and its train runs no predictions")
        return out, summary
    if len(tasks) < 2:
        out.notes.append("transfer between tasks: n/a (one task); Figure 8 holds the task's prompts on their own "
                         "task only")
    if held_out:
        out.notes.append(f"held-out transfer targets {', '.join(held_out)}: evaluated only (no train runs), so a "
                         f"column of Figure 8 without a diagonal or a prompt of their own; the distance-vs-transfer "
                         f"and predictor correlations use the trained tasks only ({', '.join(tasks)})")
    one_seed = sorted(set(summary.loc[summary["n_seeds"] < 2, "source"]), key=tasks.index)
    if one_seed:
        out.notes.append(f"transfer spread across seeds (delta_sd_ddof1): n/a for {', '.join(one_seed)} (one seed); "
                         f"their hierarchical interval resamples the examples only")
    panels = []
    for metric, name in (("exact_match", "exact match"), ("rank_accuracy", "rank accuracy")):
        mat = {v: summary_matrix(summary, metric, v, tasks, targets) for v in (
            "delta_mean", "delta_sd_ddof1", "ci95_seeds_examples_low", "ci95_seeds_examples_high", "baseline")}
        mean = mat["delta_mean"]
        text = mean.copy().astype(object)
        for a in tasks:
            for b in targets:
                m, sd = mean.loc[a, b], mat["delta_sd_ddof1"].loc[a, b]
                lo, hi = mat["ci95_seeds_examples_low"].loc[a, b], mat["ci95_seeds_examples_high"].loc[a, b]
                if np.isfinite(m):
                    text.loc[a, b] = f"{m:+.2f}" + (f"±{sd:.2f}" if np.isfinite(sd) else "") + (
                        f"\n[{lo:+.2f}, {hi:+.2f}]" if np.isfinite(lo) else "")
        base = mat["baseline"]
        cols = [(f"{b.upper()}\n(none: {base[b].dropna().iloc[0]:.2f})" if base[b].notna().any() else b.upper())
                + ("\nheld out" if b in held_out else "") for b in targets]
        values, text = figures.upper_labels(mean), figures.upper_labels(text)
        values.columns = text.columns = cols
        values.columns.name = text.columns.name = "target (no-prompt accuracy)"
        panels.append((f"Δ {name}: source prompt on target vs no prompt", values, text))
    out.outputs.append(Output(
        "transfer", "transfer", "Figure 8: zero-shot transfer",
        f"Row A, column B: accuracy of A's prompts on B's validation set minus B's no-prompt accuracy (fractions). "
        f"Each cell: delta_mean ± delta_sd_ddof1 (sample standard deviation over A's seeds), and in brackets the "
        f"95% hierarchical bootstrap interval (ci95_seeds_examples: A's seeds and B's examples resampled "
        f"together, {n_boot} resamples). The CSV also has ci95_examples, which resamples B's examples with A's "
        f"seeds held fixed (evaluation-set uncertainty only). With few examples (CB: 56, one example = 1.8 points) "
        f"and few seeds the intervals are wide: a cell whose interval contains 0 shows no measurable transfer."
        + (f" Held-out columns ({', '.join(t.upper() for t in held_out)}): targets evaluated only, with no train "
           f"runs (no diagonal, no prompt of their own)." if held_out else ""),
        summary, figures.heatmaps_figure(panels, cmap="RdBu", center=0.0, colorbar_label="accuracy change")))
    out.outputs.append(Output(
        "transfer_per_seed", "transfer", "Transfer per seed",
        "Every (source seed, target, metric): accuracy, no-prompt accuracy, change (fractions), and the runs they "
        "come from.", per_seed, show_table=False))
    if len(tasks) >= 2:
        asym, own = asymmetry_table(cells, tasks, n_boot, seed), own_task_table(cells, tasks, n_boot, seed)
        out.summary.update(transfer_asymmetry=asym.to_dict(orient="records"),
                           transfer_own_task=own.to_dict(orient="records"))
        out.outputs.append(Output(
            "transfer_asymmetry", "transfer", "Is transfer symmetric?",
            "Per pair of tasks a, b and metric: delta_ab (a's prompts on b over b's no prompt), delta_ba, their "
            "difference, and its 95% percentile interval from the two cells' hierarchical bootstraps (seeds and "
            f"examples, {n_boot} resamples each) drawn independently and subtracted; a source with one seed "
            "resamples its examples only. A distance between prompts is symmetric, but the two deltas are taken over "
            "different targets' no-prompt accuracies, so a target with more headroom can make the pair asymmetric "
            "without the prompts differing in how they transfer. The intervals are not adjusted for multiplicity: "
            "at 95% about one in 20 excludes 0 by chance.", asym))
        out.outputs.append(Output(
            "transfer_own_task", "transfer", "Is a prompt's gain largest on its own task?",
            "Per source, other target and metric: the source prompts' change on their own task (own), on the "
            "target (other), own - other, and its 95% percentile interval (the source's seeds resampled once for "
            f"both cells, each cell's examples on their own; {n_boot} resamples; a source with one seed resamples "
            "its examples only). The paper: the CB prompt's largest gain is on CB. Biased towards own: each prompt's "
            "kept epoch was chosen by its loss on its own task's validation split, the examples own is scored on "
            "(as in the paper), and other is not. Changes over different tasks' no-prompt baselines: a task whose "
            "no-prompt accuracy is already high has less to gain. Not adjusted for multiplicity.", own))
    return out, summary
