"""Norms, distances and 2-D maps of prompts (paper 5.2-5.3, Figures 6-7, Table 1).

Everything here takes prompt matrices [n, hidden]; whether they are the raw rows or the effective ones
(``analysis.inputs.effective_prompt``) is the caller's choice.

Prompts of different lengths (15/14/12/20 tokens in the paper): the distance between two prompts is defined over
their common length, ``||A[:m] - B[:m]||_F`` with ``m = min(n_A, n_B)`` ("truncate"; row i of one prompt is
compared with row i of the other, both starting from the same kind of position), or with the shorter prompt padded
with zero rows ("pad", which adds the norm of the longer prompt's extra rows). Same-length prompts get the paper's
plain ``||A - B||_F`` either way. Either way different task pairs compare different numbers of rows (the length
confound): the root-mean-square row distance ``d / sqrt(rows compared)`` (``rms_row=True``) does not grow with it.
Likewise the rms row norm ``||P||_F / sqrt(n)`` is the root mean square of the row norms (not their mean).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

DISTANCE_METHODS = ("truncate", "pad")


def prompt_norms(prompts: list[torch.Tensor]) -> pd.DataFrame:
    """One row per prompt [n_i, hidden]: ``num_tokens`` n, ``frobenius`` ||P||_F and ``rms_row_norm``
    ||P||_F / sqrt(n), the root mean square of the row norms (which does not grow with the prompt's length)."""
    rows = []
    for p in prompts:
        fro = float(torch.linalg.matrix_norm(p.double()))
        rows.append({"num_tokens": p.shape[0], "frobenius": fro, "rms_row_norm": fro / np.sqrt(p.shape[0])})
    return pd.DataFrame(rows)


def rows_compared(n_a: int, n_b: int, method: str = "truncate") -> int:
    """How many rows a distance between prompts of n_a and n_b rows compares: min (truncate) or max (pad)."""
    return min(n_a, n_b) if method == "truncate" else max(n_a, n_b)


def prompt_distance(a: torch.Tensor, b: torch.Tensor, method: str = "truncate") -> float:
    """Frobenius distance between prompts a [n_a, h] and b [n_b, h] (see the module docstring for n_a != n_b).

    Raises ValueError for a method not in DISTANCE_METHODS.
    """
    if method not in DISTANCE_METHODS:
        raise ValueError(f"distance method must be one of {DISTANCE_METHODS}, got {method!r}")
    a, b = a.double(), b.double()
    m = min(a.shape[0], b.shape[0])
    squared = (a[:m] - b[:m]).pow(2).sum()
    if method == "pad":  # the shorter prompt's missing rows are zeros: the longer one's extra rows count in full
        longer = a if a.shape[0] >= b.shape[0] else b
        squared = squared + longer[m:].pow(2).sum()
    return float(torch.sqrt(squared))


def distance_matrix(prompts: list[torch.Tensor], method: str = "truncate", rms_row: bool = False) -> np.ndarray:
    """[P, P] symmetric matrix (exactly: each pair computed once) of ``prompt_distance`` between every pair;
    ``rms_row`` divides each entry by the square root of the number of rows compared (``rows_compared``)."""
    n = len(prompts)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            d = prompt_distance(prompts[i], prompts[j], method)
            if rms_row:
                d /= np.sqrt(rows_compared(prompts[i].shape[0], prompts[j].shape[0], method))
            out[i, j] = out[j, i] = d
    return out


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """[P, d] -> [P, P] cosine similarity of every pair of rows, exactly symmetric."""
    v = np.asarray(vectors, dtype=np.float64)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    s = v @ v.T
    # a matrix product need not be bit-symmetric; (s + s.T) / 2 is, since float addition commutes
    return (s + s.T) / 2


def task_means(matrix: np.ndarray, labels: list[str], tasks: list[str]) -> pd.DataFrame:
    """Average a symmetric [P, P] prompt-pair matrix over the seed pairs of each task pair -> [T, T] DataFrame,
    exactly symmetric.

    Off the diagonal every (seed of A, seed of B) pair counts; on the diagonal the distinct seed pairs of one task
    (a prompt is not paired with itself), NaN when a task has a single seed. Each task pair is averaged once and
    written to both (A, B) and (B, A): averaging the transposed block again would differ in the last bit, and a
    rank statistic would then order two equal values (issue: Spearman with ties). Raises ValueError for a
    matrix that is not symmetric.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if not np.allclose(matrix, matrix.T, rtol=1e-12, atol=0, equal_nan=True):
        raise ValueError("task_means needs a symmetric prompt-pair matrix")
    lab = np.asarray(labels)
    out = pd.DataFrame(index=pd.Index(tasks, name="source"), columns=pd.Index(tasks, name="target"), dtype=float)
    for i, a in enumerate(tasks):
        for b in tasks[i:]:
            ia, ib = np.flatnonzero(lab == a), np.flatnonzero(lab == b)
            block = matrix[np.ix_(ia, ib)]
            if a == b:
                block = block[~np.eye(len(ia), dtype=bool)]
            out.loc[a, b] = out.loc[b, a] = float(np.mean(block)) if block.size else np.nan
    return out


PAIR_KEYS = ["task_a", "seed_a", "task_b", "seed_b"]


def prompt_pair_table(matrix: np.ndarray, labels: list[str], seeds: list[int], value: str) -> pd.DataFrame:
    """Every unordered pair of distinct prompts of a [P, P] ``matrix`` as one row: task_a, seed_a, task_b, seed_b,
    ``value``. A study of one prompt has no pair: the table is empty, with these columns."""
    rows = []
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            rows.append({"task_a": labels[i], "seed_a": seeds[i], "task_b": labels[j], "seed_b": seeds[j],
                         value: float(matrix[i, j])})
    return pd.DataFrame(rows, columns=[*PAIR_KEYS, value])


def common_length_features(prompts: list[torch.Tensor]) -> tuple[np.ndarray, int]:
    """Flatten the first m rows of every prompt (m = the shortest prompt's length) -> ([P, m * hidden], m)."""
    m = min(p.shape[0] for p in prompts)
    return np.stack([p[:m].double().flatten().numpy() for p in prompts]), m


def tsne_perplexity(n_points: int) -> float:
    """A valid t-SNE perplexity for n points: the usual rule (n - 1) / 3, capped at 30 (scikit-learn's default)
    and kept in [1, n - 1). 16 prompts -> 5."""
    return float(min(30.0, max(1.0, min((n_points - 1) / 3, n_points - 1.5))))


def coinciding(distances: np.ndarray) -> np.ndarray:
    """[P, P] distance matrix -> [P] integer group of each prompt, numbered 0, 1, ... in order of first appearance:
    prompts i and j share a group when they are at distance 0 and at equal distances from every prompt (points no
    map can tell apart; the second condition matters for truncated distances between prompts of different
    lengths, where A = B[:m] is at distance 0 from B without being B)."""
    d = np.asarray(distances, dtype=np.float64)
    groups = np.full(d.shape[0], -1)
    firsts: list[int] = []
    for i in range(d.shape[0]):
        same = next((g for g, j in enumerate(firsts) if d[i, j] == 0 and np.array_equal(d[i], d[j])), None)
        if same is None:
            same = len(firsts)
            firsts.append(i)
        groups[i] = same
    return groups


def tsne_map(distances: np.ndarray, seed: int = 0, perplexity: float | None = None) -> np.ndarray:
    """t-SNE of a [P, P] distance matrix -> [P, 2] coordinates (exact method, random init: precomputed
    distances allow no PCA init). Coinciding prompts (``coinciding``) are mapped once and share that point: t-SNE
    of identical inputs pushes them apart, drawing one prompt as several. Every prompt the same: all at (0, 0),
    a map of zero spread. ``perplexity`` defaults to ``tsne_perplexity`` of the number of distinct prompts.

    Raises:
        ValueError: fewer than 3 prompts, or 2 distinct ones among 3 or more (t-SNE needs 3 distinct points).
    """
    from sklearn.manifold import TSNE

    n = distances.shape[0]
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 prompts, got {n}")
    groups = coinciding(distances)
    k = int(groups.max()) + 1
    if k == 1:
        return np.zeros((n, 2))
    if k < 3:
        raise ValueError(f"t-SNE needs at least 3 distinct prompts, got {k} among {n}")
    firsts = [int(np.flatnonzero(groups == g)[0]) for g in range(k)]
    tsne = TSNE(n_components=2, metric="precomputed", init="random", random_state=seed, method="exact",
                perplexity=perplexity or tsne_perplexity(k))
    # a copy: scikit-learn squares a precomputed distance matrix in place
    xy = tsne.fit_transform(np.array(np.asarray(distances)[np.ix_(firsts, firsts)], dtype=np.float64, copy=True))
    return xy[groups]


def pca_map(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PCA of [P, d] features -> ([P, 2] coordinates, [2] explained variance ratio); equal rows get equal
    coordinates, bit for bit. Features without variance
    (every prompt the same) give a map of zero spread: every point at (0, 0) and ratios (0, 0), where scikit-learn
    would divide 0 by 0."""
    from sklearn.decomposition import PCA

    features = np.asarray(features, dtype=np.float64)
    if not np.any(features != features[:1]):
        return np.zeros((features.shape[0], 2)), np.zeros(2)
    pca = PCA(n_components=min(2, *features.shape)).fit(features)
    # each distinct row projected once: fit_transform's U * S can differ in the last bits between equal rows
    distinct, inverse = np.unique(features, axis=0, return_inverse=True)
    coords = pca.transform(distinct)[inverse.reshape(-1)]
    if coords.shape[1] < 2:  # fewer than 2 prompts or features: pad so callers always get [P, 2]
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    ratio = np.pad(pca.explained_variance_ratio_, (0, 2 - len(pca.explained_variance_ratio_)))
    return coords, ratio
