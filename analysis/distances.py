"""Distances between prompts (paper 5.3, Figure 7): every prompt pair, task-level means, within-task spread.

Four measures, raw and effective: ``frobenius`` ||A - B||_F over the rows compared (``geometry``) and
``rms_row_distance`` = frobenius / sqrt(rows compared), the root-mean-square row distance. With prompts of
different lengths each task pair compares its own number of rows (the length confound, ``rows_compared``
columns): the Frobenius distance of a pair grows with sqrt(rows compared), the rms row distance does not.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis import figures, geometry
from analysis.inputs import Inputs
from analysis.results import Output, Section


def distance_matrices(inputs: Inputs, distance: str) -> dict[str, np.ndarray]:
    """Every measure as a [P, P] symmetric matrix over the prompts in matrix order: frobenius_raw,
    rms_row_distance_raw and, when the effective prompt is defined, frobenius_effective and
    rms_row_distance_effective."""
    spaces = {"raw": inputs.raw}
    if inputs.effective is not None:
        spaces["effective"] = inputs.effective
    out = {}
    for space, mats in spaces.items():
        out[f"frobenius_{space}"] = geometry.distance_matrix(mats, distance)
        out[f"rms_row_distance_{space}"] = geometry.distance_matrix(mats, distance, rms_row=True)
    return out


def rows_compared_matrix(inputs: Inputs, distance: str) -> pd.DataFrame:
    """[T, T] number of rows each task pair's distance compares (``geometry.rows_compared`` of their lengths)."""
    n = {p.task: p.num_tokens for p in inputs.prompts}
    return pd.DataFrame([[geometry.rows_compared(n[a], n[b], distance) for b in inputs.tasks] for a in inputs.tasks],
                        index=pd.Index(inputs.tasks, name="source"), columns=pd.Index(inputs.tasks, name="target"))


def within_task(pairs: pd.DataFrame, tasks: list[str], measures: list[str]) -> pd.DataFrame:
    """Per task and measure, over the distances between its distinct seed pairs: num_pairs, mean, min, max,
    sd_ddof1 (sample standard deviation) and cv_ddof1 = sd_ddof1 / mean (small: the seeds are nearly
    equidistant, the paper's claim). NaN where a task has fewer than 2 (mean) or 3 (sd) seed pairs, and cv_ddof1
    NaN where the mean is 0 (the task's prompts coincide: no spread to set against a mean)."""
    rows = []
    for task in tasks:
        sub = pairs[(pairs.task_a == task) & (pairs.task_b == task)] if len(pairs) else pairs
        for k in measures:
            v = sub[k].to_numpy(dtype=float) if len(sub) else np.array([])
            mean = float(v.mean()) if v.size else np.nan
            sd = float(v.std(ddof=1)) if v.size > 1 else np.nan
            rows.append({"task": task, "measure": k, "num_pairs": int(v.size), "mean": mean,
                         "min": float(v.min()) if v.size else np.nan, "max": float(v.max()) if v.size else np.nan,
                         "sd_ddof1": sd, "cv_ddof1": sd / mean if v.size > 1 and mean else np.nan})
    return pd.DataFrame(rows)


def distance_definition(distance: str) -> str:
    """The distance method in words (the report's header and captions)."""
    return ("over the common length: ||A[:m] - B[:m]||_F with m = min(n_A, n_B)" if distance == "truncate"
            else "the shorter prompt padded with zero rows to the longer one's length")


def distances_section(*, inputs: Inputs, matrices: dict[str, np.ndarray], distance: str) -> Section:
    """Figure 7 (task-level mean distances), within-task spread and every prompt pair, from the [P, P]
    ``matrices`` of ``distance_matrices``."""
    labels, tasks = inputs.labels, inputs.tasks
    task_mats = {k: geometry.task_means(v, labels, tasks) for k, v in matrices.items()}
    rows = rows_compared_matrix(inputs, distance)
    long = pd.concat([m.stack().rename("distance").reset_index().assign(measure=k)
                      for k, m in task_mats.items()], ignore_index=True)
    long["rows_compared"] = [int(rows.loc[a, b]) for a, b in zip(long["source"], long["target"])]
    pairs = None
    for k, v in matrices.items():
        t = geometry.prompt_pair_table(v, labels, inputs.seeds, k)
        pairs = t if pairs is None else pairs.merge(t, on=geometry.PAIR_KEYS)
    pairs.insert(4, "rows_compared", [int(rows.loc[a, b]) for a, b in zip(pairs.task_a, pairs.task_b)])
    method = distance_definition(distance)
    out = Section(summary={"distances": {k: m.to_dict() for k, m in task_mats.items()}, "distances_method": method,
                           "rows_compared": rows.to_dict()},
                  meta={"distance_definition": method})
    if inputs.effective is None:
        out.notes.append("the effective prompt is not defined for this model: effective distances are n/a")
    if len(inputs.prompts) < 2:  # no pair: Figure 7 and its tables would hold n/a only
        out.notes.append("distances between prompts (Figure 7): n/a (the study has one prompt)")
        return out
    one_seed = [t for t in tasks if labels.count(t) < 2]
    if one_seed:
        out.notes.append(f"within-task distances (the diagonal of Figure 7): n/a for {', '.join(one_seed)} "
                         f"(one seed)")
    panels = []
    for k, title in (("frobenius_raw", "Frobenius distance, raw (paper's Figure 7)"),
                     ("frobenius_effective", "Frobenius distance, effective"),
                     ("rms_row_distance_raw", "RMS row distance (/ sqrt rows compared), raw"),
                     ("rms_row_distance_effective", "RMS row distance, effective")):
        if k in task_mats:
            text = task_mats[k].map(lambda v: f"{v:.3g}")
            panels.append((title, figures.upper_labels(task_mats[k]), figures.upper_labels(text)))
    counts = ", ".join(f"{a.upper()}-{b.upper()} {rows.loc[a, b]}" for i, a in enumerate(tasks)
                       for b in tasks[i + 1:])
    out.outputs.append(Output(
        "distances", "distances", "Figure 7: distance between the prompts of two tasks",
        f"Mean distance over all seed pairs of two tasks; the diagonal is the mean over the distinct seed pairs of "
        f"one task (within-task spread). Prompts of different lengths are compared {method}, so task pairs "
        f"compare different numbers of rows (length confound; rows compared: {counts or 'one task'}): the "
        f"Frobenius distance grows with sqrt(rows compared), the rms row distance = Frobenius / sqrt(rows "
        f"compared) does not.", long,
        figures.heatmaps_figure(panels, colorbar_label="distance (lower = more similar)"), show_table=False))
    out.outputs.append(Output(
        "within_task", "distances", "Within-task distances (are the seeds equidistant?)",
        "For each task and measure, over the distances between its distinct seed pairs: mean, min, max, sample "
        "standard deviation (sd_ddof1) and cv_ddof1 = sd_ddof1 / mean (a small cv: the seeds are nearly "
        "equidistant, the paper's claim).", within_task(pairs, tasks, list(matrices))))
    out.outputs.append(Output("distance_pairs", "distances", "Every prompt pair",
                              "Distance between every two prompts, all measures, and the rows each compares.",
                              pairs, show_table=False))
    return out
