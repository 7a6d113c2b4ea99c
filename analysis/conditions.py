"""A study with conditions (``ptray.condition``: init, length, optimizer, ... studies): which runs the paper's
sections read, and the conditions section that compares the conditions per task.

Which runs the paper's sections read is ``analysis.views.paper_view``.

The conditions section, per task and condition (every condition, SPoT ones included):

- exact match and rank accuracy on the validation split (the train runs' own predictions): the mean over seeds x
  examples, with the hierarchical (seeds x examples) 95% bootstrap interval of ``transfer.hierarchical_bootstrap_ci``;
- epochs to the best epoch (``best_epoch``) and epochs run: mean and sample standard deviation (ddof=1) over seeds;
- the prompt norms (Frobenius and rms row norm, raw and effective) and the within-task distance (mean over the
  distinct seed pairs, Frobenius and rms row distance): the paper's stochasticity measures;
- transfer: the mean accuracy change of the condition's prompts on the other tasks (off the diagonal, held-out
  targets included) over the target's no prompt, from its transfer runs (``transfer.transfer_tables``).

The test across conditions: ``analysis.paired.paired_bootstrap`` (condition A against B on one task, the same
examples for both, each condition's seeds resampled independently), with Holm's adjustment per metric.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import torch

from analysis import figures, geometry, transfer
from analysis.paired import correctness_matrix, holm, paired_bootstrap
from analysis.records import PromptRun, Study
from analysis.results import Output, Section
from analysis.views import best_trials, is_search

METRICS = transfer.METRICS


# ----------------------------------------------------------------------------------------------- tables
def _groups(study: Study) -> dict[tuple[str, str], list[PromptRun]]:
    """(task, condition) -> its prompts by seed (in a search: the best trial per seed)."""
    prompts = best_trials(study.prompts) if is_search(study) else study.prompts
    out: dict[tuple[str, str], list[PromptRun]] = {}
    for c in study.conditions:
        for t in study.tasks:
            ps = sorted((p for p in prompts if p.condition == c and p.task == t), key=lambda p: p.seed)
            if ps:
                out[(t, c)] = ps
    return out


def _mean_sd(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    return (float(v.mean()) if v.size else np.nan), (float(v.std(ddof=1)) if v.size > 1 else np.nan)


def per_seed_table(study: Study, effective=None) -> pd.DataFrame:
    """One row per prompt of a condition: task, condition, seed, lr, the recorded exact match / rank accuracy,
    best_epoch, epochs_run, and the norms (raw; effective where ``effective`` maps a prompt to its effective rows,
    NaN otherwise)."""
    rows = []
    for (task, cond), ps in _groups(study).items():
        raw = geometry.prompt_norms([p.prompt for p in ps])
        effs = [effective(p.prompt) if effective is not None else None for p in ps]
        eff = geometry.prompt_norms([e for e in effs if e is not None]) if all(e is not None for e in effs) else None
        for i, p in enumerate(ps):
            rows.append({"task": task, "condition": cond, "seed": p.seed, "lr": p.lr, "num_tokens": p.num_tokens,
                         "exact_match": p.metrics.get("exact_match"), "rank_accuracy": p.metrics.get("rank_accuracy"),
                         "best_epoch": p.metrics.get("best_epoch"), "epochs_run": p.metrics.get("epochs_run"),
                         "frobenius_raw": raw["frobenius"][i], "rms_row_norm_raw": raw["rms_row_norm"][i],
                         "frobenius_effective": eff["frobenius"][i] if eff is not None else np.nan,
                         "rms_row_norm_effective": eff["rms_row_norm"][i] if eff is not None else np.nan})
    return pd.DataFrame(rows)


def condition_table(study: Study, n_boot: int = 2000, seed: int = 0, distance: str = "truncate",
                    effective=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(per_seed, table)``: ``per_seed_table`` and one row per (task, condition) with n_seeds, n_examples, for
    each metric ``<m>_mean`` (over seeds x examples, or the recorded values without predictions) and
    ``<m>_ci95_seeds_examples_low/high`` (hierarchical bootstrap), ``best_epoch_mean``/``_sd_ddof1``,
    ``epochs_run_mean``, the norms' ``<c>_mean``/``_sd_ddof1``, ``within_<measure>_mean`` over the distinct seed
    pairs (NaN with one seed), and ``transfer_delta_<m>`` (mean change over no prompt on the other tasks,
    ``transfer_targets`` of them; NaN without transfer runs). Accuracies are fractions (0-1)."""
    per_seed = per_seed_table(study, effective)
    rows = []
    groups = _groups(study)
    transfer_by_condition = {}
    for c in study.conditions:
        chosen = [p for ps in groups.values() for p in ps if p.condition == c]
        _, summary = transfer.transfer_tables(study.select(chosen), n_boot=0, seed=seed)
        transfer_by_condition[c] = summary
    for (task, cond), ps in groups.items():
        row = {"task": task, "condition": cond, "n_seeds": len(ps), "n_examples": None}
        for m in METRICS:
            mat, idx = correctness_matrix(ps, m)
            if idx:
                row["n_examples"] = len(idx)
                row[f"{m}_mean"] = float(mat.sum()) / mat.size
                lo, hi = transfer.hierarchical_bootstrap_ci(mat, n_boot, seed=seed)
            else:
                row[f"{m}_mean"] = _mean_sd(p.metrics.get(m) for p in ps)[0]
                lo = hi = np.nan
            row[f"{m}_ci95_seeds_examples_low"], row[f"{m}_ci95_seeds_examples_high"] = lo, hi
        row["best_epoch_mean"], row["best_epoch_sd_ddof1"] = _mean_sd(p.metrics.get("best_epoch") for p in ps)
        row["epochs_run_mean"] = _mean_sd(p.metrics.get("epochs_run") for p in ps)[0]
        sub = per_seed[(per_seed.task == task) & (per_seed.condition == cond)]
        for col in ("frobenius_raw", "rms_row_norm_raw", "frobenius_effective", "rms_row_norm_effective"):
            row[f"{col}_mean"], row[f"{col}_sd_ddof1"] = _mean_sd(sub[col])
        mats = [p.prompt for p in ps]
        for name, rms in (("frobenius_raw", False), ("rms_row_distance_raw", True)):
            d = geometry.distance_matrix(mats, distance, rms_row=rms)
            pairs = d[np.triu_indices(len(mats), 1)]
            row[f"within_{name}_mean"] = float(pairs.mean()) if pairs.size else np.nan
        summary = transfer_by_condition.get(cond, pd.DataFrame())
        off = summary[(summary.source == task) & (summary.target != task)] if len(summary) else summary
        row["transfer_targets"] = int(off["target"].nunique()) if len(off) else 0
        for m in METRICS:
            vals = off.loc[off.metric == m, "delta_mean"] if len(off) else pd.Series(dtype=float)
            row[f"transfer_delta_{m}"] = float(vals.mean()) if len(vals) else np.nan
        rows.append(row)
    return per_seed, pd.DataFrame(rows)


def condition_tests(study: Study, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Every task, metric and pair of conditions (A before B in the declared order): ``paired_bootstrap`` of A
    against B on the examples both were scored on (``n_seeds_a``, ``n_seeds_b``, ``n_examples``, ``diff`` =
    accuracy(A) - accuracy(B), ``ci95_low/high``, ``p_boot``) and ``p_holm`` (Holm over the rows of one metric).
    Pairs without per-example predictions are left out. Each row's bootstrap is seeded with ``seed``."""
    groups = _groups(study)
    rows = []
    for task in study.tasks:
        for m in METRICS:
            for a, b in itertools.combinations(study.conditions, 2):
                if (task, a) not in groups or (task, b) not in groups:
                    continue
                pa, pb = groups[(task, a)], groups[(task, b)]
                mat, idx = correctness_matrix(pa + pb, m)
                if not idx:
                    continue
                res = paired_bootstrap(mat[:len(pa)], mat[len(pa):], n_boot, seed=seed)
                rows.append({"task": task, "metric": m, "condition_a": a, "condition_b": b, "n_seeds_a": len(pa),
                             "n_seeds_b": len(pb), "n_examples": len(idx), **res})
    out = pd.DataFrame(rows, columns=["task", "metric", "condition_a", "condition_b", "n_seeds_a", "n_seeds_b",
                                      "n_examples", "diff", "ci95_low", "ci95_high", "p_boot"])
    out["p_holm"] = np.nan
    for m in METRICS:
        sel = out.metric == m
        if sel.any():
            out.loc[sel, "p_holm"] = holm(out.loc[sel, "p_boot"])
    return out


# ----------------------------------------------------------------------------------------------- section
def _wide(table: pd.DataFrame, value: str, conditions: list[str], tasks: list[str]) -> pd.DataFrame:
    """One row per task, one column per condition (``<condition>``) of ``value``."""
    wide = table.pivot(index="task", columns="condition", values=value).reindex(index=tasks, columns=conditions)
    return wide.reset_index()


def _bars(table: pd.DataFrame, conditions: list[str], tasks: list[str], panels: list[tuple], per_seed=None):
    """A bars figure: panels of (value column, title, ylabel, errors: None, an sd column or (low, high))."""
    out = []
    for value, title, ylabel, err in panels:
        data = _wide(table, value, conditions, tasks)
        series = [(f"{c}", c) for c in conditions]
        errors = {}
        if isinstance(err, tuple):
            for c in conditions:
                lo, hi = (_wide(table, e, conditions, tasks)[c] for e in err)
                data[f"{c}__lo"], data[f"{c}__hi"] = lo.to_numpy(), hi.to_numpy()
                errors[c] = (f"{c}__lo", f"{c}__hi")
        elif isinstance(err, str):
            for c in conditions:
                data[f"{c}__sd"] = _wide(table, err, conditions, tasks)[c].to_numpy()
                errors[c] = f"{c}__sd"
        panel = {"data": data, "category": "task", "series": series, "title": title, "ylabel": ylabel,
                 "errors": errors}
        if per_seed is not None and value.removesuffix("_mean") in per_seed:
            col = value.removesuffix("_mean")
            dots = per_seed.pivot_table(index=["task", "seed"], columns="condition", values=col).reset_index()
            panel["dots"] = dots
        out.append(panel)
    return figures.bars_figure(out)


def conditions_section(*, study: Study, n_boot: int, seed: int, distance: str, effective=None) -> Section:
    """The conditions section (see the module docstring): the per-(task, condition) table, one figure per
    measure (accuracy, epochs to best, norms, within-task distance, transfer) and the paired test across
    conditions, its seed in ``analysis.json`` (``conditions_test``). ``effective`` maps a prompt [n, embed_dim] to
    its effective rows (None: effective norms n/a)."""
    conditions, tasks = study.conditions, study.tasks
    per_seed, table = condition_table(study, n_boot, seed, distance, effective)
    tests = condition_tests(study, n_boot, seed)
    test_meta = {"seed": seed, "n_boot": n_boot, "level": 0.95,
                 "method": "paired hierarchical bootstrap: examples drawn once for both conditions, each "
                           "condition's seeds drawn independently; two-sided p with add-one; Holm per metric"}
    out = Section(summary={"conditions": table.to_dict(orient="records"),
                           "conditions_tests": tests.to_dict(orient="records"), "conditions_test": test_meta},
                  meta={"conditions": conditions})
    one_seed = sorted({f"{r.task}/{r.condition}" for r in table.itertuples() if r.n_seeds < 2})
    if one_seed:
        out.notes.append(f"conditions: spread across seeds and within-task distance n/a for {', '.join(one_seed)} "
                         f"(one seed); their intervals resample the examples only")
    if len(conditions) < 2:
        out.notes.append("conditions: one condition, so no test across conditions")
    if is_search(study):
        out.notes.append("conditions: in a search each task and seed is its finished trial with the lowest eval loss")
    where = ", ".join(conditions)
    out.outputs.append(Output(
        "conditions", "conditions", f"Conditions per task ({where})",
        f"Per task and condition: exact match and rank accuracy on the validation split (the train runs' own "
        f"best-epoch predictions; mean over seeds x examples, fractions) with the 95% hierarchical bootstrap "
        f"interval (seeds and examples resampled together, {n_boot} resamples, seed {seed}); epochs to the best "
        f"epoch and epochs run (mean; sd_ddof1 = sample standard deviation over seeds); the prompt norms (Frobenius "
        f"and rms row norm ||P||_F / sqrt(n), raw and effective); the within-task distance (mean over distinct seed "
        f"pairs, Frobenius and rms row distance, {distance}); transfer_delta = the mean accuracy change of the "
        f"condition's prompts on the other tasks (transfer_targets of them, held-out targets included) over the "
        f"target's no prompt.", table))
    out.outputs.append(Output(
        "conditions_accuracy", "conditions", "Accuracy per task and condition",
        "Bars: mean over seeds x examples; error bars: 95% hierarchical bootstrap interval (seeds x examples); "
        "dots: seeds (recorded accuracy).", table,
        _bars(table, conditions, tasks, [(f"{m}_mean", name, "accuracy", (f"{m}_ci95_seeds_examples_low",
                                                                          f"{m}_ci95_seeds_examples_high"))
                                         for m, name in (("exact_match", "exact match"),
                                                         ("rank_accuracy", "rank accuracy"))], per_seed),
        show_table=False))
    out.outputs.append(Output(
        "conditions_epochs", "conditions", "Epochs to the best epoch per task and condition",
        "Bars: mean best epoch over seeds; error bars: sample standard deviation (ddof=1); dots: seeds.", table,
        _bars(table, conditions, tasks, [("best_epoch_mean", "epochs to the best epoch", "epoch",
                                          "best_epoch_sd_ddof1")], per_seed), show_table=False))
    out.outputs.append(Output(
        "conditions_norms", "conditions", "Prompt norms per task and condition",
        "Bars: mean over seeds; error bars: sample standard deviation (ddof=1); dots: seeds. The Frobenius norm "
        "grows with the prompt's length; the rms row norm ||P||_F / sqrt(n) compares across lengths.", table,
        _bars(table, conditions, tasks, [("frobenius_raw_mean", "Frobenius norm, raw", "||P||_F",
                                          "frobenius_raw_sd_ddof1"),
                                         ("rms_row_norm_raw_mean", "RMS row norm, raw", "norm per row",
                                          "rms_row_norm_raw_sd_ddof1")], per_seed), show_table=False))
    out.outputs.append(Output(
        "conditions_within_task", "conditions", "Within-task distance per task and condition",
        f"Mean distance between the distinct seed pairs of one task and condition ({distance}); n/a with one seed. "
        f"The rms row distance divides by sqrt(rows compared), so conditions of different lengths compare.",
        table, _bars(table, conditions, tasks, [("within_frobenius_raw_mean", "Frobenius distance, raw", "distance",
                                                 None),
                                                ("within_rms_row_distance_raw_mean", "RMS row distance, raw",
                                                 "distance per row", None)]), show_table=False))
    if table[[f"transfer_delta_{m}" for m in METRICS]].notna().any().any():
        out.outputs.append(Output(
            "conditions_transfer", "conditions", "Zero-shot transfer per task and condition",
            "Mean accuracy change of a task's prompts on the other tasks (held-out targets included) over each "
            "target's no prompt, per condition (fractions).", table,
            _bars(table, conditions, tasks, [(f"transfer_delta_{m}", f"Δ {name} on other tasks", "accuracy change",
                                              None) for m, name in (("exact_match", "exact match"),
                                                                    ("rank_accuracy", "rank accuracy"))]),
            show_table=False))
    else:
        out.notes.append("conditions: transfer per condition n/a (no transfer runs between tasks)")
    out.outputs.append(Output(
        "conditions_tests", "conditions", "Condition A against condition B, per task",
        f"diff = accuracy(A) - accuracy(B) over seeds x examples (fractions), on the examples both were scored on. "
        f"Paired hierarchical bootstrap ({n_boot} resamples, seed {seed}): each resample draws the examples once "
        f"for both conditions and each condition's seeds independently; ci95 is its percentile interval, p_boot "
        f"the two-sided bootstrap p-value (2 min(share <= 0, share >= 0), add-one), p_holm Holm's adjustment over "
        f"every comparison of the metric. With few seeds the seed resampling dominates the interval.", tests))
    out.outputs.append(Output("conditions_per_seed", "conditions", "Conditions per seed",
                              "Every prompt of every condition: recorded accuracies, epochs, norms.", per_seed,
                              show_table=False))
    return out


def effective_map(model):
    """A prompt -> its effective rows (``analysis.inputs.effective_prompt``) for ``model``, or None where the
    family defines none."""
    from analysis.inputs import effective_prompt

    probe = torch.zeros(1, model.get_input_embeddings().weight.shape[1])
    if effective_prompt(model, probe) is None:
        return None
    return lambda p: effective_prompt(model, p)
