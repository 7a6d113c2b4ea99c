"""A search (a Tune search over a TrainConfig field, e.g. the ``lr`` study): the searched value against the eval
loss per task, which trials the scheduler stopped early, and the best value per task.

Every train run of the study is a trial (``Study.trials``): finished (FINISHED) or stopped by the scheduler
(KILLED with ``ptray.stopped_by``, e.g. ``asha``: it may have no artifacts, its numbers come from its per-epoch
metrics). A trial's score is ``best_eval_loss``, the lowest validation loss it reached (the search's metric,
``eval_loss``, mode min); the best trial of a task (and condition) is the one with the lowest, over every trial (a
stopped trial can only be best if it had reached the lowest loss before it was stopped: said in a note).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis import figures
from analysis.records import Study
from analysis.results import Output, Section
from ptray import layout

COLUMNS = ["task", "condition", "seed", "lr", "status", "stopped", "stopped_by", "epochs_run", "best_epoch",
           "best_eval_loss", "eval_loss", "exact_match", "rank_accuracy", "best", "run_id", "run_name"]


def trials_table(study: Study) -> pd.DataFrame:
    """One row per trial (``COLUMNS``): ``stopped`` is True for a trial a scheduler stopped, ``best`` for the
    trial with the lowest ``best_eval_loss`` of its task and condition (ties: the lower lr). Sorted by task
    (registry order), condition, lr."""
    rows = [{"task": t.task, "condition": t.condition, "seed": t.seed, "lr": t.lr, "status": t.status,
             "stopped": t.status == layout.KILLED, "stopped_by": t.stopped_by,
             **{k: t.metrics.get(k) for k in ("epochs_run", "best_epoch", "best_eval_loss", "eval_loss",
                                             "exact_match", "rank_accuracy")},
             "best": False, "run_id": t.run_id, "run_name": t.run_name} for t in study.trials]
    table = pd.DataFrame(rows, columns=COLUMNS)
    if table.empty:
        return table
    for col in ("lr", "epochs_run", "best_epoch", "best_eval_loss", "eval_loss", "exact_match", "rank_accuracy"):
        table[col] = pd.to_numeric(table[col], errors="coerce").astype(float)
    order = {t: i for i, t in enumerate(_tasks(study))}
    table["_order"] = table["task"].map(order)
    table = table.sort_values(["_order", "condition", "lr", "seed"], na_position="last", kind="stable")
    table = table.drop(columns="_order").reset_index(drop=True)
    for _, g in table.groupby(["task", "condition"], dropna=False, sort=False):
        scored = g[g["best_eval_loss"].notna()]
        if len(scored):
            table.loc[scored.sort_values(["best_eval_loss", "lr"], kind="stable").index[0], "best"] = True
    return table


def _tasks(study: Study) -> list[str]:
    from ptray.data.tasks import TASK_NAMES

    present = {t.task for t in study.trials}
    return [t for t in TASK_NAMES if t in present] + sorted(present - set(TASK_NAMES))


def best_table(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per task and condition: ``n_trials``, ``n_stopped``, the best trial's ``best_lr``,
    ``best_eval_loss``, ``best_status`` and its exact match / rank accuracy (finished trials only)."""
    rows = []
    for (task, cond), g in trials.groupby(["task", "condition"], dropna=False, sort=False):
        best = g[g["best"]]
        b = best.iloc[0] if len(best) else None
        rows.append({"task": task, "condition": cond, "n_trials": len(g), "n_stopped": int(g["stopped"].sum()),
                     "stopped_by": ", ".join(sorted({s for s in g["stopped_by"] if isinstance(s, str) and s})),
                     "lr_min": float(g["lr"].min()), "lr_max": float(g["lr"].max()),
                     "best_lr": float(b["lr"]) if b is not None else np.nan,
                     "best_eval_loss": float(b["best_eval_loss"]) if b is not None else np.nan,
                     "best_status": b["status"] if b is not None else None,
                     "best_exact_match": float(b["exact_match"]) if b is not None else np.nan,
                     "best_rank_accuracy": float(b["rank_accuracy"]) if b is not None else np.nan})
    return pd.DataFrame(rows)


def search_section(*, study: Study) -> Section:
    """The searched values against the eval loss (a figure per task and the trials' table), the stopped trials and
    the best value per task."""
    trials = trials_table(study)
    best = best_table(trials)
    out = Section(summary={"search": {"trials": trials.to_dict(orient="records"),
                                      "best": best.to_dict(orient="records")}})
    if trials["lr"].isna().all():
        out.notes.append("search: no trial records its lr; the figure has no x values")
    if trials.groupby(["task", "condition"], dropna=False).size().max() < 2:
        out.notes.append("search: one trial per task, nothing to compare")
    stopped_best = best[best["best_status"] == layout.KILLED]
    if len(stopped_best):
        out.notes.append(f"search: the lowest eval loss of {', '.join(stopped_best['task'])} was reached by a trial "
                         f"the scheduler stopped; the paper's sections read the best finished trial")
    n_stopped = int(trials["stopped"].sum())
    out.outputs.append(Output(
        "search", "search", "Search: learning rate against eval loss",
        f"Each point is one trial: its lr (log scale) against the lowest validation loss it reached (mean token "
        f"NLL of the gold answers, the search's metric). Dots: finished trials; crosses: trials the scheduler "
        f"stopped early ({n_stopped} of {len(trials)}; status KILLED, ptray.stopped_by); ringed: the best trial "
        f"of the task. Trials stopped early ran fewer epochs (epochs_run), so their loss is the loss when stopped.",
        trials, figures.search_figure(trials, list(dict.fromkeys(trials["task"]))), show_table=False))
    out.outputs.append(Output(
        "search_best", "search", "Best learning rate per task",
        "Per task (and condition): trials, trials stopped by the scheduler and by which, the lr range searched, "
        "the best trial's lr, its lowest eval loss and status, and its accuracies (finished trials: the best "
        "epoch's, fractions).", best))
    out.outputs.append(Output("search_trials", "search", "Every trial",
                              "One row per trial: lr, status, who stopped it, epochs run, best epoch, losses, "
                              "accuracies (finished trials).", trials, show_table=False))
    return out
