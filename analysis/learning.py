"""Learning: how each prompt's validation loss and accuracy moved epoch by epoch, and where its task's floors are.

- ``learning_table``: one row per prompt and epoch, from each train run's ``history.json`` (``PromptRun.history``):
  task, condition, seed, epoch, eval_loss (mean negative log-likelihood per answer token, nats), rank_accuracy,
  exact_match (fractions of the validation examples), and whether it is the run's best epoch (the one its prompt
  was kept from).
- ``floors_table``: one row per task (and condition, in a study with conditions), the accuracies a trained prompt
  should be read against, all on the same validation examples (the train runs' ``predictions.json`` ``idx``): the
  share of the majority class (a classifier that always answers it has this rank accuracy), no prompt and the init
  text as a hard prompt (the train runs' baselines), and the trained prompts (mean over seeds, their min and max).

This section reads every trained prompt of the study, each condition and SPoT run included (in a search: the best
trial per task and seed), unlike the paper's sections, which read one condition. A prompt whose rank accuracy stays
at the majority share has learnt the label prior, not the task: read a prompt against the larger of the floors,
not only against no prompt. The labels are read from the local data folder the runs name (or ``--data-dir``),
never downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis import figures
from analysis.records import PromptRun
from analysis.results import Output, Section

CURVE_COLUMNS = ["task", "condition", "seed", "epoch", "eval_loss", "rank_accuracy", "exact_match", "best"]
FLOOR_COLUMNS = ["task", "condition", "num_examples", "majority_label", "majority_share", "no_prompt_rank_accuracy",
                 "init_text_rank_accuracy", "prompt_rank_accuracy_mean", "prompt_rank_accuracy_min",
                 "prompt_rank_accuracy_max", "num_prompts"]
NO_CONDITION = "-"  # the condition cell of a study without conditions


def _condition(p: PromptRun) -> str:
    return p.condition or NO_CONDITION


def learning_table(prompts: list[PromptRun]) -> pd.DataFrame:
    """One row per prompt and epoch it ran (``CURVE_COLUMNS``); prompts without a history have no rows. ``best``
    marks the epoch whose prompt the run kept (its ``best_epoch``)."""
    rows = []
    for p in prompts:
        best = p.metrics.get("best_epoch")
        for h in p.history:
            rows.append({"task": p.task, "condition": _condition(p), "seed": p.seed, "epoch": int(h["epoch"]),
                         **{k: _num(h.get(k)) for k in ("eval_loss", "rank_accuracy", "exact_match")},
                         "best": best is not None and int(h["epoch"]) == int(best)})
    return pd.DataFrame(rows, columns=CURVE_COLUMNS).sort_values(["task", "condition", "seed", "epoch"],
                                                                 ignore_index=True)


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else np.nan


def _idx(p: PromptRun) -> list[int]:
    return [int(i) for i in p.predictions.get("idx", [])]


def validation_labels(prompts: list[PromptRun], data_dir: str | None = None) -> tuple[dict[str, list[int]], list[str]]:
    """The gold label (an index into the task's labels) of each example a task's prompts were scored on, in the
    order of their ``predictions.json`` ``idx``, read from the local data folder each run's config.json names
    (``data_dir`` overrides it; nothing is downloaded): ``({task: labels}, notes)``. A task gets a note instead of
    labels when its prompts were scored on different examples, its data folder is not on this machine or cannot
    be read, or an example is not a labeled one of that data; each task is read once and noted once."""
    from ptray.data.superglue import DEFAULT_HUB_DATASET, load_split
    from ptray.data.tasks import get_task
    from ptray.errors import PtrayError

    by_task: dict[str, list[PromptRun]] = {}
    for p in prompts:
        if _idx(p):
            by_task.setdefault(p.task, []).append(p)
    out: dict[str, list[int]] = {}
    notes: list[str] = []
    for task_name, ps in by_task.items():
        idx = _idx(ps[0])
        if any(_idx(p) != idx for p in ps[1:]):
            notes.append(f"{task_name}: majority class not computed (its prompts were scored on different "
                         f"validation examples)")
            continue
        cfg = ps[0].config
        folder = data_dir or cfg.get("data_dir")
        if not folder or not Path(folder).is_dir():
            notes.append(f"{task_name}: majority class not computed (the runs' data folder {folder!r} is not on "
                         f"this machine; pass --data-dir)")
            continue
        try:
            examples = load_split(get_task(task_name), cfg.get("eval_split", "val"), folder,
                                  cfg.get("hub_dataset") or DEFAULT_HUB_DATASET)
        except PtrayError as err:
            notes.append(f"{task_name}: majority class not computed (its validation data could not be read: {err})")
            continue
        label = {e.idx: e.label for e in examples}
        missing = [i for i in idx if label.get(i) is None]
        if missing:
            notes.append(f"{task_name}: majority class not computed ({len(missing)} scored examples, e.g. idx "
                         f"{missing[0]}, are not labeled examples of the data read now)")
            continue
        out[task_name] = [int(label[i]) for i in idx]
    return out, notes


def floors_table(prompts: list[PromptRun], labels: dict[str, list[int]], tasks: list[str]) -> pd.DataFrame:
    """One row per task of ``tasks`` and condition (``FLOOR_COLUMNS``): ``num_examples`` scored, the majority class
    of ``labels[task]`` (its name and share; NaN without labels), no prompt's and the init text's rank accuracy (the
    mean of the train runs' recorded baselines: the same examples, the same number for every seed), and the trained
    prompts' recorded rank accuracy (mean, min, max over seeds)."""
    from ptray.data.tasks import get_task

    rows = []
    for t in tasks:
        for c in sorted({_condition(p) for p in prompts if p.task == t}):
            ps = [p for p in prompts if p.task == t and _condition(p) == c]
            acc = np.array([_num(p.metrics.get("rank_accuracy")) for p in ps], dtype=float)
            n = {len(_idx(p)) for p in ps} - {0}
            finite = np.isfinite(acc).any()
            row = {"task": t, "condition": c, "num_examples": n.pop() if len(n) == 1 else np.nan,
                   "majority_label": None, "majority_share": np.nan, "num_prompts": len(ps),
                   "no_prompt_rank_accuracy": _mean(p.metrics.get("no_prompt_rank_accuracy") for p in ps),
                   "init_text_rank_accuracy": _mean(p.metrics.get("init_text_rank_accuracy") for p in ps),
                   "prompt_rank_accuracy_mean": float(np.nanmean(acc)) if finite else np.nan,
                   "prompt_rank_accuracy_min": float(np.nanmin(acc)) if finite else np.nan,
                   "prompt_rank_accuracy_max": float(np.nanmax(acc)) if finite else np.nan}
            if labels.get(t):
                counts = np.bincount(labels[t])
                row["majority_label"] = get_task(t).labels[int(counts.argmax())]
                row["majority_share"] = float(counts.max() / counts.sum())
                row["num_examples"] = len(labels[t])
            rows.append(row)
    return pd.DataFrame(rows, columns=FLOOR_COLUMNS)


def _mean(values) -> float:
    v = np.array([_num(x) for x in values], dtype=float)
    return float(np.nanmean(v)) if np.isfinite(v).any() else np.nan


def learning_section(*, prompts: list[PromptRun], tasks: list[str], data_dir: str | None = None) -> Section:
    """The learning curves figure (eval loss and rank accuracy per epoch, one line per seed, one column per task
    and condition, the floors of ``floors_table`` as horizontal lines) and the floors table. Prompts without a
    history (runs logged before histories were artifacts) leave the curves out with a note."""
    curves = learning_table(prompts)
    labels, notes = validation_labels(prompts, data_dir)
    floors = floors_table(prompts, labels, tasks)
    without = sorted({p.label for p in prompts if not p.history})
    if without:
        notes.append(f"no per-epoch history for {len(without)} prompt(s) ({', '.join(without[:6])}"
                     f"{', ...' if len(without) > 6 else ''}): left out of the learning curves")
    out = []
    if not curves.empty:
        out.append(Output(
            "learning_curves", "learning", "Learning curves",
            "Per task (and condition: one column each), the validation eval loss (top: mean negative "
            "log-likelihood per answer token, nats) and rank accuracy (bottom: fraction of the validation "
            "examples) after each epoch, one line per seed; a ringed dot marks the epoch each run kept (its best "
            "eval loss). Horizontal lines: the majority class's share of the same examples (dotted), no prompt "
            "(dashed) and the init text as a hard prompt (dash-dotted).", curves,
            figures.learning_curves_figure(curves, floors, tasks), show_table=False))
    out.append(Output(
        "accuracy_floors", "learning", "Accuracy floors: the majority class, no prompt, the init text",
        "Per task (and condition), on the validation examples its prompts were scored on: the majority class (the "
        "label most examples have) and its share, which a prompt that always answers it reaches as rank accuracy; "
        "no prompt's and the init text's rank accuracy (as hard prompt); the trained prompts' rank accuracy (mean, "
        "min and max over seeds).", floors))
    summary = {"accuracy_floors": floors.to_dict(orient="records")}
    metrics = {f"majority_share_{t}": share for t, share in
               floors.groupby("task", sort=False)["majority_share"].first().items() if np.isfinite(share)}
    return Section(outputs=out, summary=summary, metrics=metrics, notes=notes)
