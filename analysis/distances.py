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


def drift_matrices(inputs: Inputs, distance: str) -> dict[str, np.ndarray]:
    """[P, P] rms row distances between the prompts' moves from their task's init-text prompt, P_i - P_init(task_i),
    raw (``rms_row_distance_drift_raw``) and, when defined, effective (``rms_row_distance_drift_effective``): the
    seeds of a task share their init, so their prompts sit together before any training; their moves do not.
    Empty when a task's init prompt is not defined (an init other than text)."""
    if any(inputs.init.get(t) is None for t in inputs.tasks):
        return {}
    moves = {"raw": [p.prompt.float() - inputs.init[p.task].float() for p in inputs.prompts]}
    if inputs.effective is not None and inputs.init_effective is not None and all(
            inputs.init_effective.get(t) is not None for t in inputs.tasks):
        moves["effective"] = [e - inputs.init_effective[p.task] for e, p in zip(inputs.effective, inputs.prompts)]
    return {f"rms_row_distance_drift_{k}": geometry.distance_matrix(v, distance, rms_row=True)
            for k, v in moves.items()}


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


# label permutations in the test of task clusters (the p-value's resolution is 1 / (TASK_CLUSTER_PERMUTATIONS + 1))
TASK_CLUSTER_PERMUTATIONS = 9999


def silhouettes(d: np.ndarray, labelings: np.ndarray) -> np.ndarray:
    """Mean silhouette score of each labelling of ``labelings`` [L, P] (integer labels) on the precomputed
    distances ``d`` [P, P], all at once: scikit-learn's ``silhouette_score(d, labels, metric="precomputed")``
    (a(i) the mean distance to the other members of i's cluster, b(i) the smallest mean distance to another
    cluster, s(i) = (b - a) / max(a, b), 0 for a member of a one-prompt cluster), vectorised over labellings
    (tested equal to scikit-learn). Returns [L]."""
    lab = np.asarray(labelings)
    if lab.ndim != 2 or not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0:
        raise ValueError("labelings must be [L, P] non-negative integer labels")
    if not np.isfinite(d).all():
        raise ValueError("the distances must be finite")
    k = int(lab.max()) + 1
    onehot = (lab[:, :, None] == np.arange(k)).astype(float)  # [L, P, K]
    sums = np.einsum("ij,ljk->lik", d, onehot)  # [L, P, K]: distance of prompt i to all members of cluster k
    sizes = onehot.sum(axis=1, keepdims=True)  # [L, 1, K]
    own = onehot.astype(bool)
    own_size = (sizes * onehot).sum(axis=2)  # [L, P]
    with np.errstate(divide="ignore", invalid="ignore"):
        a = (sums * onehot).sum(axis=2) / (own_size - 1)
        other = np.where(own | (sizes == 0), np.inf, sums / sizes)
        b = other.min(axis=2)
        s = np.where(own_size > 1, (b - a) / np.maximum(a, b), 0.0)
    return np.nan_to_num(s, nan=0.0).mean(axis=1)


def task_clusters(matrices: dict[str, np.ndarray], labels: list[str], n_perm: int = TASK_CLUSTER_PERMUTATIONS,
                  seed: int = 0) -> pd.DataFrame:
    """Do a task's prompts sit closer to each other than to other tasks' (Figure 6's clusters, measured on the
    distances rather than read off a t-SNE map)? One row per rms row distance measure of ``matrices`` ([P, P],
    prompts labelled by task in ``labels``): ``within_mean`` and ``between_mean`` (mean distance over same-task
    and different-task prompt pairs), their ratio, the silhouette score of the task labels (``silhouettes``,
    scikit-learn's definition: 1 = tight separate clusters, 0 = none, below 0 = mixed), and ``p_permutation``: the
    share of ``n_perm`` random relabellings of the prompts (task sizes kept, seeded by ``seed``) whose silhouette
    is at least the observed one, counting the observed labelling ((1 + k) / (1 + n_perm)). Empty unless there
    are 2 or more tasks and a task with 2 or more prompts."""
    _, lab = np.unique(np.asarray(labels), return_inverse=True)
    cols = ["measure", "num_prompts", "num_tasks", "within_mean", "between_mean", "within_between_ratio",
            "silhouette", "p_permutation", "num_permutations"]
    n_tasks = int(lab.max()) + 1 if len(lab) else 0
    if n_tasks < 2 or n_tasks >= len(labels):
        return pd.DataFrame(columns=cols)
    rng = np.random.default_rng(seed)
    perms = np.stack([rng.permutation(lab) for _ in range(n_perm)])
    same = lab[:, None] == lab[None, :]
    off = ~np.eye(len(lab), dtype=bool)
    rows = []
    for k, d in matrices.items():
        if not k.startswith("rms_row_distance"):
            continue
        observed = float(silhouettes(d, lab[None])[0])
        null = np.concatenate([silhouettes(d, perms[i:i + 1000]) for i in range(0, n_perm, 1000)])
        within, between = d[same & off].mean(), d[~same].mean()
        rows.append({"measure": k, "num_prompts": len(lab), "num_tasks": n_tasks, "within_mean": float(within),
                     "between_mean": float(between),
                     "within_between_ratio": float(within / between) if between > 0 else np.nan,
                     "silhouette": observed,
                     "p_permutation": float((1 + np.sum(null >= observed - 1e-12)) / (1 + n_perm)),
                     "num_permutations": n_perm})
    return pd.DataFrame(rows, columns=cols)


def distance_definition(distance: str) -> str:
    """The distance method in words (the report's header and captions)."""
    return ("over the common length: ||A[:m] - B[:m]||_F with m = min(n_A, n_B)" if distance == "truncate"
            else "the shorter prompt padded with zero rows to the longer one's length")


def distances_section(*, inputs: Inputs, matrices: dict[str, np.ndarray], distance: str, seed: int = 0) -> Section:
    """Figure 7 (task-level mean distances), within-task spread, task clusters (``task_clusters``, its
    permutations seeded by ``seed``) and every prompt pair, from the [P, P] ``matrices`` of
    ``distance_matrices``."""
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
    clusters = task_clusters({**matrices, **drift_matrices(inputs, distance)}, labels, seed=seed)
    if len(clusters):
        out.summary["task_clusters"] = clusters.to_dict(orient="records")
        out.outputs.append(Output(
            "task_clusters", "distances", "Do a task's prompts cluster? (Figure 6, measured)",
            "Per rms row distance (raw, effective, and the same between the prompts' moves from their init, "
            "P - P_init, where the init is the task's text): the mean distance between prompts of one task and "
            "between prompts of different tasks, their ratio, the silhouette score of the task labels on the "
            "distances (scikit-learn's definition; 1 = separate tight clusters, 0 = no structure), and a "
            f"permutation p-value: the share of {TASK_CLUSTER_PERMUTATIONS} random relabellings of the prompts (task "
            "sizes kept) with a silhouette at least as high, the observed one counted. A task's seeds start from one "
            "init prompt (and have its length), so the prompts cluster by task before any training: their clusters "
            "show where they started. The moves (drift rows) cluster only if training moved a task's seeds alike. "
            "A t-SNE map can draw clusters that the distances do not hold; these are the numbers it illustrates.",
            clusters))
    out.outputs.append(Output("distance_pairs", "distances", "Every prompt pair",
                              "Distance between every two prompts, all measures, and the rows each compares.",
                              pairs, show_table=False))
    return out
