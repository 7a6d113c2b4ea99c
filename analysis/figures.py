"""Figures: DataFrames / arrays in, matplotlib Figures out. Saving (PNG beside the numbers) is ``report``'s job.

Figures are built as ``matplotlib.figure.Figure`` objects, not through pyplot: no global figure registry, no GUI
backend, nothing to close, whatever backend the calling process uses."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from analysis.fonts import FontSet, font_set

INIT_COLOUR = "#c0392b"  # the paper marks tokens of the init text in red
SCRIPT_COLOUR = "#1f5fbf"  # the script of a neighbour in another script than the init text
MAX_LABEL = 14  # characters of a token shown in a cell; the CSV has the whole token


def task_colours(tasks: list[str]) -> dict[str, tuple]:
    """One RGBA colour per task (tab10, in ``tasks`` order), the same in every figure."""
    cmap = colormaps["tab10"]
    return {t: cmap(i % 10) for i, t in enumerate(tasks)}


def upper_labels(df: pd.DataFrame) -> pd.DataFrame:
    """A [source, target] task matrix with its task names upper-cased for display (axes named source, target)."""
    out = df.copy()
    out.index = [str(i).upper() for i in out.index]
    out.columns = [str(c).upper() for c in out.columns]
    out.index.name, out.columns.name = "source", "target"
    return out


def _shorten(text: str, limit: int = MAX_LABEL) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _token_text(ax, x, y, text, fonts: FontSet, **kw):
    label, families = fonts.prepare(_shorten(text))
    return ax.text(x, y, label, fontfamily=families, **kw)


def nearest_figure(table: pd.DataFrame, task: str, title: str, fonts: FontSet | None = None) -> Figure:
    """The paper's Figures 2-5 for one task: prompt rows top to bottom, the k nearest tokens left (most similar)
    to right, one block of columns per seed, the row's init-text token first; tokens of the init text in red.

    ``table``: rows of one task with columns seed, row, rank, token_visible, cosine, in_init_text, init_token.
    """
    fonts = fonts or font_set()
    seeds = sorted(table["seed"].unique())
    k = int(table["rank"].max()) + 1
    n_rows = int(table["row"].max()) + 1
    cell_w, cell_h, row_w, init_w = 1.25, 0.42, 0.45, 1.35
    width = row_w + init_w + len(seeds) * k * cell_w + 0.3 * len(seeds)
    height = n_rows * cell_h + 1.5
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    top = 1.05
    ax.text(0.1, 0.3, title, fontsize=12, fontweight="bold", va="center")
    ax.text(0.1, 0.62, f"{k} nearest vocabulary tokens by cosine similarity; most similar left; red = token of "
            "the init text; grey number = cosine; blue = a script the init text does not use", fontsize=8.5,
            color="#444", va="center")
    ax.text(row_w / 2, top - 0.15, "row", ha="center", fontsize=8.5, fontweight="bold")
    ax.text(row_w + init_w / 2, top - 0.15, "init token", ha="center", fontsize=8.5, fontweight="bold")
    by = {(r.seed, r.row, r.rank): r for r in table.itertuples()}
    cells, shades = [], []  # one PatchCollection: a patch per cell is slow to add
    x0 = row_w + init_w
    for si, seed in enumerate(seeds):
        xs = x0 + si * (k * cell_w + 0.3) + 0.15
        ax.text(xs + k * cell_w / 2, top - 0.15, f"seed {seed}", ha="center", fontsize=9, fontweight="bold")
        for row in range(n_rows):
            y = top + row * cell_h
            for rank in range(k):
                r = by.get((seed, row, rank))
                x = xs + rank * cell_w
                cells.append(Rectangle((x, y), cell_w, cell_h))
                shades.append("#f7f7f7" if row % 2 else "white")
                if r is None:
                    continue
                colour = INIT_COLOUR if r.in_init_text else "black"
                _token_text(ax, x + cell_w / 2, y + cell_h * 0.4, r.token_visible, fonts, ha="center",
                            va="center", fontsize=9, color=colour,
                            fontweight="bold" if r.in_init_text else "normal")
                ax.text(x + cell_w - 0.05, y + cell_h - 0.04, f"{r.cosine:.2f}", ha="right", va="bottom",
                        fontsize=5.5, color="#888")
                if getattr(r, "other_script", False):  # a script the init text does not use: name it
                    ax.text(x + 0.05, y + cell_h - 0.04, _shorten(str(r.script)), ha="left", va="bottom",
                            fontsize=5.5, color=SCRIPT_COLOUR)
    first = table[table["seed"] == seeds[0]]
    init_by_row = dict(zip(first["row"], first["init_token"]))
    for row in range(n_rows):
        y = top + row * cell_h
        ax.text(row_w / 2, y + cell_h / 2, str(row), ha="center", va="center", fontsize=8.5, color="#444")
        cells.append(Rectangle((row_w, y), init_w - 0.1, cell_h))
        shades.append("#eef3fb")
        _token_text(ax, row_w + (init_w - 0.1) / 2, y + cell_h / 2, str(init_by_row.get(row, "")), fonts,
                    ha="center", va="center", fontsize=9, color="#1f4e8c")
    ax.add_collection(PatchCollection(cells, facecolors=shades, edgecolors="#bbb", linewidths=0.5, zorder=0))
    return fig


def prompt_maps_figure(maps: list[tuple[str, np.ndarray, str]], labels: list[str], seeds: list[int],
                       tasks: list[str]) -> Figure:
    """Figure 6 and companions: one panel per (title, [P, 2] coordinates, axis note), points coloured by task,
    the seeds of a task joined by lines (a closed outline around their centre for 3+ seeds)."""
    colours = task_colours(tasks)
    cols = 2
    rows = math.ceil(len(maps) / cols)
    fig = Figure(figsize=(5.6 * cols, 4.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    lab = np.asarray(labels)
    for ax, (title, coords, note) in zip(axes.flat, maps):
        for task in tasks:
            idx = np.flatnonzero(lab == task)
            centre = coords[idx].mean(axis=0)
            # join the seeds around their centre (by angle), so the outline never crosses itself
            idx = idx[np.argsort(np.arctan2(*(coords[idx] - centre).T[::-1]))]
            pts = coords[idx]
            ring = np.vstack([pts, pts[:1]]) if len(pts) > 2 else pts
            ax.plot(ring[:, 0], ring[:, 1], "-", color=colours[task], alpha=0.5, linewidth=1.2)
            ax.scatter(pts[:, 0], pts[:, 1], color=colours[task], s=45, label=task.upper(), zorder=3,
                       edgecolor="white", linewidth=0.6)
            by_seed = sorted(idx, key=lambda i: seeds[i])
            for i, (x, y) in zip(idx, pts):
                # stagger the labels by seed, so seeds that land on one spot stay readable
                k = by_seed.index(i)
                ax.annotate(str(seeds[i]), (x, y), textcoords="offset points", fontsize=7, color="#333",
                            xytext=(5, 8 * (k - (len(idx) - 1) / 2)), va="center")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(note, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=8, loc="best", framealpha=0.8)
    for ax in list(axes.flat)[len(maps):]:
        ax.axis("off")
    fig.text(0.5, 0.005, "numbers next to points: seeds", ha="center", fontsize=8, color="#555")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return fig


def heatmaps_figure(panels: list[tuple[str, pd.DataFrame, pd.DataFrame | None]], cmap: str = "viridis_r",
                    center: float | None = None, colorbar_label: str = "", ncols: int = 2,
                    cell_font: float = 7.5) -> Figure:
    """A grid of [source x target] heatmaps: (title, values, text) per panel; ``text`` holds each cell's label
    (None: the value to 3 significant figures); tick labels are the index / column labels as given.
    ``center`` makes a diverging colour scale symmetric around it."""
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 4.7 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    for ax, (title, values, text) in zip(axes.flat, panels):
        v = values.to_numpy(dtype=float)
        finite = v[np.isfinite(v)]
        if center is not None:
            span = np.max(np.abs(finite - center)) if finite.size else 1.0
            span = span or 1.0
            im = ax.imshow(v, cmap=cmap, vmin=center - span, vmax=center + span)
        else:
            im = ax.imshow(v, cmap=cmap)
        ax.set_xticks(range(v.shape[1]), [str(c) for c in values.columns], fontsize=8.5)
        ax.set_yticks(range(v.shape[0]), [str(i) for i in values.index], fontsize=8.5)
        ax.set_xlabel(values.columns.name or "", fontsize=9)
        ax.set_ylabel(values.index.name or "", fontsize=9)
        ax.set_title(title, fontsize=10)
        norm = im.norm
        for i in range(v.shape[0]):
            for j in range(v.shape[1]):
                label = "n/a" if not np.isfinite(v[i, j]) else (
                    str(text.iat[i, j]) if text is not None else f"{v[i, j]:.3g}")
                shade = norm(v[i, j]) if np.isfinite(v[i, j]) else 0.5
                rgba = im.cmap(shade)
                light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.55
                ax.text(j, i, label, ha="center", va="center", fontsize=cell_font,
                        color="black" if light else "white")
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        cb.ax.tick_params(labelsize=7)
        if colorbar_label:
            cb.set_label(colorbar_label, fontsize=8)
    fig.tight_layout()
    return fig


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def scatter_figure(points: pd.DataFrame, panels: list[tuple[str, str, str, dict]], tasks: list[str],
                   ncols: int = 3) -> Figure:
    """Predictor against transfer gain: one panel per (x column, y column, title, correlation dict: a row of
    ``analysis.correlation.correlation_table``); each point is an ordered (source, target) pair: colour = source
    task, marker = target task (legends below the panels)."""
    colours = task_colours(tasks)
    markers = {t: MARKERS[i % len(MARKERS)] for i, t in enumerate(tasks)}
    cols = min(ncols, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.9 * cols, 4.3 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (x, y, title, corr) in zip(axes.flat, panels):
        for r in points.itertuples():
            xv, yv = getattr(r, x), getattr(r, y)
            if np.isfinite(xv) and np.isfinite(yv):
                ax.scatter(xv, yv, color=colours.get(r.source, "grey"), marker=markers.get(r.target, "o"), s=46,
                           zorder=3, edgecolor="black", linewidth=0.4)
        ax.axhline(0, color="#999", linewidth=0.7, zorder=1)
        ax.ticklabel_format(useOffset=False, axis="both")
        yvals = points[y].to_numpy(dtype=float)
        if np.isfinite(yvals).any() and np.ptp(yvals[np.isfinite(yvals)]) == 0:  # all gains equal (often 0)
            centre = float(yvals[np.isfinite(yvals)][0])
            ax.set_ylim(centre - 0.1, centre + 0.1)
        ax.set_xlabel(x.replace("_", " "), fontsize=8.5)
        ax.set_ylabel(y.replace("_", " "), fontsize=8.5)
        ax.tick_params(labelsize=7)
        ax.set_title(f"{title}\nSpearman ρ {_fmt(corr['spearman_rho'])} (Mantel p={_fmt(corr['spearman_p_mantel'])}, "
                     f"naive p={_fmt(corr['spearman_p_naive'])}), Pearson r {_fmt(corr['pearson_r'])}, "
                     f"n={corr['n_pairs']}", fontsize=8.5)
        ax.margins(0.15)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [Line2D([], [], linestyle="", marker="o", color=colours[t], markeredgecolor="black",
                      markeredgewidth=0.4, label=f"source {t.upper()}") for t in tasks]
    handles += [Line2D([], [], linestyle="", marker=markers[t], color="white", markeredgecolor="black",
                       label=f"target {t.upper()}") for t in tasks]
    fig.legend(handles=handles, loc="lower center", ncol=len(tasks) * 2 if len(tasks) <= 5 else len(tasks),
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.6 / fig.get_figheight(), 1, 1))
    return fig


def _fmt(v: float) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.2f}"


def bars_figure(panels: list[dict], ncols: int = 2) -> Figure:
    """Grouped bars, one panel per dict with keys: data (DataFrame), category (column: one group per value),
    series ([(column, legend label)]), title, ylabel, and optionally errors ({column: error column, a symmetric
    error, or (low column, high column), an interval}), dots (DataFrame with the category and the same columns: one
    dot per seed on its bar) and ylim."""
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(6.2 * ncols, 4.3 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    cmap = colormaps["Set2"]
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        data, category, series = panel["data"], panel["category"], panel["series"]
        errors, dots = panel.get("errors") or {}, panel.get("dots")
        cats = list(data[category])
        width = 0.8 / len(series)
        for s, (col, name) in enumerate(series):
            xs = np.arange(len(cats)) + (s - (len(series) - 1) / 2) * width
            err = _yerr(data, col, errors.get(col))
            ax.bar(xs, data[col].to_numpy(dtype=float), width * 0.92, yerr=err, label=name, color=cmap(s),
                   capsize=3, error_kw={"linewidth": 0.8})
            if dots is not None and col in dots:
                for ci, cat in enumerate(cats):
                    vals = dots.loc[dots[category] == cat, col].to_numpy(dtype=float)
                    ax.scatter(np.full(vals.shape, xs[ci]), vals, s=9, color="black", zorder=3)
        if panel.get("ylim"):
            ax.set_ylim(*panel["ylim"])
        ax.set_xticks(range(len(cats)), [str(c).upper() for c in cats], fontsize=9)
        ax.set_ylabel(panel["ylabel"], fontsize=9)
        ax.set_title(panel["title"], fontsize=10)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=min(3, len(series)),
                  frameon=False)
    fig.tight_layout()
    return fig


def _yerr(data: pd.DataFrame, col: str, error) -> np.ndarray | None:
    """Matplotlib's yerr for one series: a symmetric error column, or an interval (low, high) as distances from the
    bar (missing: no error bar)."""
    if error is None:
        return None
    if isinstance(error, str):
        return np.nan_to_num(data[error].to_numpy(dtype=float))
    mean = data[col].to_numpy(dtype=float)
    low, high = (data[c].to_numpy(dtype=float) for c in error)
    return np.nan_to_num(np.clip(np.stack([mean - low, high - mean]), 0, None))


def search_figure(trials: pd.DataFrame, tasks: list[str], x: str = "lr", y: str = "best_eval_loss",
                  ncols: int = 3) -> Figure:
    """A search's trials: one panel per task, ``x`` (log scale) against ``y``; finished trials as dots, trials a
    scheduler stopped as crosses, the best trial ringed (column ``best``, bool)."""
    cols = min(ncols, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig = Figure(figsize=(4.8 * cols, 3.9 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    colours = task_colours(tasks)
    for ax, task in zip(axes.flat, tasks):
        sub = trials[trials["task"] == task]
        for stopped, marker, label in ((False, "o", "finished"), (True, "x", "stopped by the scheduler")):
            part = sub[sub["stopped"] == stopped]
            if len(part):
                ax.scatter(part[x], part[y], marker=marker, s=42, color=colours[task], label=label, zorder=3,
                           linewidths=1.4)
        best = sub[sub["best"]]
        ax.scatter(best[x], best[y], s=170, facecolors="none", edgecolors="black", linewidths=1.2, zorder=4,
                   label="best")
        if (sub[x] > 0).all() and len(sub):
            ax.set_xscale("log")
        ax.set_xlabel(x, fontsize=9)
        ax.set_ylabel(y.replace("_", " "), fontsize=9)
        ax.set_title(task.upper(), fontsize=10)
        ax.tick_params(labelsize=7.5)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def correlation_bars_figure(stats: pd.DataFrame, labels: dict[str, str], signs: dict[str, int]) -> Figure:
    """Spearman correlation of every predictor with each transfer gain, as horizontal bars with the Mantel p-value
    written beside each bar. ``stats``: rows of ``analysis.correlation.correlation_table``; ``labels`` and
    ``signs`` (+1, -1, or 0 for a confound) per predictor."""
    preds = list(dict.fromkeys(stats["predictor"]))
    gains = list(dict.fromkeys(stats["gain"]))
    fig = Figure(figsize=(9.5, 0.75 * len(preds) + 1.6))
    ax = fig.subplots()
    height = 0.8 / len(gains)
    cmap = colormaps["Set2"]
    for g, gain in enumerate(gains):
        sub = stats[stats["gain"] == gain].set_index("predictor").reindex(preds)
        ys = np.arange(len(preds)) + (g - (len(gains) - 1) / 2) * height
        r = sub["spearman_rho"].to_numpy(dtype=float)
        ax.barh(ys, np.nan_to_num(r), height * 0.9, color=cmap(g), label=gain.replace("delta_", "Δ ").replace(
            "_", " "))
        for y, rv, pv in zip(ys, r, sub["spearman_p_mantel"].to_numpy(dtype=float)):
            note = "n/a" if not np.isfinite(rv) else f"{rv:+.2f} (Mantel p={pv:.2g})"
            ax.text(1.04, y, note, va="center", ha="left", fontsize=7.5, transform=ax.get_yaxis_transform())
    expected = {1: "expected +", -1: "expected −", 0: "confound"}
    ax.set_yticks(range(len(preds)), [f"{labels.get(p, p)}\n({expected[signs.get(p, 0)]})" for p in preds],
                  fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(-1, 1)
    ax.axvline(0, color="#666", linewidth=0.8)
    ax.set_xlabel("Spearman correlation with the transfer gain (ordered task pairs)", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(gains), frameon=False)
    fig.tight_layout()
    return fig


def learning_curves_figure(curves: pd.DataFrame, floors: pd.DataFrame, tasks: list[str]) -> Figure:
    """Per task and condition (a column) eval loss (top row) and rank accuracy (bottom row) against the epoch, one
    line per seed from ``curves`` (``analysis.learning.learning_table``), a ringed dot on each run's kept epoch; the
    bottom row draws ``floors`` (``analysis.learning.floors_table``): majority share, no prompt and init text as
    horizontal lines. One legend for every panel."""
    panels = [(t, c) for t in tasks for c in sorted(curves.loc[curves["task"] == t, "condition"].unique())]
    fig = Figure(figsize=(max(3.6 * len(panels), 7.5), 6.2))  # room for the legend with one panel
    axes = fig.subplots(2, len(panels), squeeze=False)
    seeds = sorted(curves["seed"].unique())
    cmap = colormaps["viridis"]
    floor_lines = [("majority_share", "majority class", ":"), ("no_prompt_rank_accuracy", "no prompt", "--"),
                   ("init_text_rank_accuracy", "init text", "-.")]
    for col, (task, condition) in enumerate(panels):
        rows = curves[(curves["task"] == task) & (curves["condition"] == condition)]
        for metric, ax in (("eval_loss", axes[0, col]), ("rank_accuracy", axes[1, col])):
            for i, seed in enumerate(seeds):
                run = rows[rows["seed"] == seed]
                if run.empty:
                    continue
                colour = cmap(i / max(1, len(seeds) - 1) * 0.85)
                ax.plot(run["epoch"], run[metric], marker=".", markersize=3, linewidth=1.1, color=colour,
                        label=f"seed {seed}")
                kept = run[run["best"]]
                ax.scatter(kept["epoch"], kept[metric], s=28, color=colour, edgecolors="black", zorder=3)
            ax.tick_params(labelsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch", fontsize=8)
        title = task.upper() if condition == "-" else f"{task.upper()} · {condition}"
        axes[0, col].set_title(title, fontsize=10)
        floor = floors[(floors["task"] == task) & (floors["condition"] == condition)]
        for key, name, style in floor_lines:
            value = float(floor[key].iloc[0]) if not floor.empty else np.nan
            if np.isfinite(value):
                axes[1, col].axhline(value, color="grey", linestyle=style, linewidth=1, label=name)
        axes[1, col].set_ylim(0, 1)
    axes[0, 0].set_ylabel("eval loss (nats per answer token)", fontsize=8)
    axes[1, 0].set_ylabel("rank accuracy", fontsize=8)
    legend: dict[str, Line2D] = {}  # every panel's entries once: a seed or floor missing from the first is kept
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    order = [f"seed {s}" for s in seeds] + [name for _, name, _ in floor_lines]
    labels = [x for x in order if x in legend]
    fig.legend([legend[x] for x in labels], labels, loc="lower center", ncol=min(7, len(labels)), fontsize=7.5,
               frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig
