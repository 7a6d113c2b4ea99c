"""From a Study (records) and the frozen model to every table, figure and number of the report.

``compute`` is the whole analysis in one readable function of small steps; it does no I/O (the model forward
passes aside). Each step returns ``Output``s: a figure and the numbers it draws, or a table alone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis import figures, geometry, nearest, predictors, transfer
from analysis.records import PromptRun, Study

log = logging.getLogger("ptray.analysis")


@dataclass
class Options:
    """How the analysis runs. Every field has a default."""

    top_k: int = 3  # nearest tokens per prompt row (the paper shows 3)
    distance: str = "truncate"  # how prompts of different lengths are compared: truncate or pad
    n_boot: int = 2000  # bootstrap resamples for the transfer intervals
    seed: int = 0  # seeds t-SNE and the bootstrap
    faithfulness: bool = True  # evaluate discretised prompts (needs the data and model forward passes)
    data_dir: str | None = None  # overrides the train runs' data_dir for the faithfulness check
    batch_size: int = 32  # evaluation sequences per step
    chunk: int = 32768  # vocabulary rows per similarity block in the nearest-token search

    def __post_init__(self):
        if self.distance not in geometry.DISTANCE_METHODS:
            raise ValueError(f"distance must be one of {geometry.DISTANCE_METHODS}, got {self.distance!r}")
        if self.top_k < 1 or self.n_boot < 0 or self.batch_size < 1 or self.chunk < 1:
            raise ValueError("top_k, batch_size and chunk must be positive and n_boot not negative")


@dataclass
class Output:
    """One item of the report: a figure (or None) and the numbers behind it (DataFrame -> CSV, dict -> JSON)."""

    name: str
    section: str
    title: str
    text: str
    data: pd.DataFrame | dict
    figure: Any = None
    show_table: bool = True  # show the numbers as a table in the HTML report


@dataclass
class Results:
    meta: dict[str, Any]
    outputs: list[Output] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)  # analysis.json
    metrics: dict[str, float] = field(default_factory=dict)  # logged as MLflow metrics of the analysis run


SECTIONS = {
    "nearest": "Nearest tokens (paper 5.1, Figures 2-5)",
    "stochasticity": "Stochasticity (paper 5.2, Figure 6, Table 1)",
    "distances": "Distances between prompts (Figure 7)",
    "transfer": "Zero-shot transfer (Figure 8)",
    "correlation": "Does distance predict transfer?",
    "predictors": "Other transferability predictors",
    "faithfulness": "Faithfulness of the nearest-token reading",
}


def _init_prompts(prompts: list[PromptRun], embedding: torch.Tensor, tokenizer) -> dict[str, torch.Tensor | None]:
    """Each task's starting prompt (its init text's token embeddings, repeated / cut to n as in training);
    None for a task whose prompts did not start from text."""
    from ptray.prompt import PromptInit, init_prompt

    out: dict[str, torch.Tensor | None] = {}
    for p in prompts:
        if p.task in out:
            continue
        cfg = p.config
        if cfg.get("init", "text") != PromptInit.TEXT.value or not cfg.get("init_text"):
            out[p.task] = None
            continue
        out[p.task] = init_prompt(embedding, tokenizer, PromptInit.TEXT, cfg["init_text"], p.num_tokens)
    return out


def _init_token_ids(p: PromptRun, tokenizer) -> list[int]:
    from ptray.prompt import repeat_to, text_token_ids

    text = p.config.get("init_text")
    if not text:
        return []
    return repeat_to(text_token_ids(tokenizer, text), p.num_tokens)


def compute(study: Study, model, tokenizer, options: Options | None = None, notes: list[str] | None = None
            ) -> Results:
    """Every analysis of the issue, in order: nearest tokens, norms and maps, distances, transfer, correlation,
    predictors, faithfulness."""
    opt = options or Options()
    notes = list(notes or [])
    prompts = study.sorted_prompts()
    tasks = study.tasks
    labels = [p.task for p in prompts]
    seeds = [p.seed for p in prompts]
    embedding = model.get_input_embeddings().weight.detach().float().cpu()
    hidden = embedding.shape[1]
    bad = [p.label for p in prompts if p.prompt.shape[1] != hidden]
    if bad:
        from ptray.errors import PtrayError

        raise PtrayError(f"prompts {', '.join(bad)} have hidden size {prompts[0].prompt.shape[1]} but the model's "
                         f"embeddings have {hidden}; pass --model with the model the study trained on")
    norm = geometry.input_norm(model)
    if norm is None:
        notes.append("the model applies no LayerNorm to its input embeddings: effective rows = raw rows")
    eff = [geometry.effective(p.prompt, norm) for p in prompts]
    init = _init_prompts(prompts, embedding, tokenizer)

    meta = {
        "experiment": study.experiment, "study": study.study, "model": prompts[0].config.get("model"),
        "num_prompts": len(prompts), "tasks": tasks,
        "seeds": {t: sorted(p.seed for p in prompts if p.task == t) for t in tasks},
        "num_tokens": {t: next(p.num_tokens for p in prompts if p.task == t) for t in tasks},
        "init_text": {t: next(p.config.get("init_text") for p in prompts if p.task == t) for t in tasks},
        "hidden_size": hidden, "vocab_size": int(embedding.shape[0]),
        "input_layernorm": norm.name if norm is not None else None,
        "distance_method": opt.distance, "top_k": opt.top_k, "n_boot": opt.n_boot,
        "num_transfer_runs": sum(e.kind == "transfer" for e in study.evals),
        "num_baseline_runs": sum(e.kind == "baseline" for e in study.evals),
        "notes": notes,
    }
    res = Results(meta=meta)
    top1 = _nearest(res, prompts, embedding, tokenizer, norm, opt)
    _stochasticity(res, prompts, eff, init, norm, tasks, labels, seeds, opt)
    dist = _distances(res, prompts, eff, tasks, labels, seeds, opt)
    summary = _transfer(res, study, tasks, opt)
    pairs = _pairs(res, model, prompts, eff, init, norm, tasks, labels, dist, summary, opt)
    _correlations(res, pairs, tasks)
    if opt.faithfulness:
        _faithfulness(res, prompts, embedding, top1, model, tokenizer, tasks, opt)
    else:
        notes.append("faithfulness check skipped (--no-faithfulness)")
    res.summary["meta"] = meta
    return res


def _nearest(res: Results, prompts, embedding, tokenizer, norm, opt: Options) -> dict[str, list[torch.Tensor]]:
    """Nearest tokens of every row, raw and effective; returns each space's top-1 ids per prompt."""
    rows = torch.cat([p.prompt for p in prompts])
    spaces = {"raw": None} if norm is None else {"raw": None, "effective": norm}
    top1: dict[str, list[torch.Tensor]] = {}
    records, timing = [], {}
    for space, transform in spaces.items():
        t0 = time.perf_counter()
        sims, ids = nearest.nearest_tokens(rows, embedding, opt.top_k, opt.chunk, transform)
        timing[space] = time.perf_counter() - t0
        log.info("nearest tokens (%s): %d rows x %d vocab in %.2fs", space, rows.shape[0], embedding.shape[0],
                 timing[space])
        offsets = np.cumsum([0] + [p.num_tokens for p in prompts])
        top1[space] = [ids[offsets[i]:offsets[i + 1], 0].clone() for i in range(len(prompts))]
        for i, p in enumerate(prompts):
            init_ids = _init_token_ids(p, tokenizer)
            init_set = set(init_ids)
            for row in range(p.num_tokens):
                for rank in range(ids.shape[1]):
                    tid = int(ids[offsets[i] + row, rank])
                    text = nearest.token_text(tokenizer, tid)
                    init_id = init_ids[row] if init_ids else None
                    records.append({
                        "space": space, "task": p.task, "seed": p.seed, "row": row, "rank": rank,
                        "token_id": tid, "token": text, "token_visible": nearest.visible(text),
                        "token_escaped": nearest.escaped(text), "cosine": float(sims[offsets[i] + row, rank]),
                        "in_init_text": tid in init_set, "init_token_id": init_id,
                        "init_token": nearest.visible(nearest.token_text(tokenizer, init_id))
                        if init_id is not None else "",
                    })
    table = pd.DataFrame(records)
    res.meta["nearest_seconds"] = {k: round(v, 3) for k, v in timing.items()}
    stats = []
    for (space, task), g in table.groupby(["space", "task"], sort=False):
        first = g[g["rank"] == 0]
        stats.append({"space": space, "task": task,
                      "top1_is_init_token": float((first["token_id"] == first["init_token_id"]).mean()),
                      "topk_in_init_text": float(g["in_init_text"].mean()),
                      "mean_top1_cosine": float(first["cosine"].mean())})
    stats = pd.DataFrame(stats)
    res.summary["nearest"] = stats.to_dict(orient="records")
    for space in spaces:
        for task in dict.fromkeys(p.task for p in prompts):
            sub = table[(table["space"] == space) & (table["task"] == task)].reset_index(drop=True)
            init_text = next(p.config.get("init_text", "") for p in prompts if p.task == task)
            where = "raw rows (the paper's reading)" if space == "raw" else \
                "rows after the input LayerNorm (what the model sees), against LayerNormed vocabulary rows"
            fig = figures.nearest_figure(sub, task, f"{task.upper()} prompt, {space}: \"{init_text}\"")
            res.outputs.append(figures_output(
                f"nearest_{task}" + ("" if space == "raw" else "_effective"), "nearest",
                f"{task.upper()}: nearest tokens, {space}",
                f"Top-{opt.top_k} vocabulary tokens by cosine similarity for every row of every {task.upper()} "
                f"prompt, on {where}. Rows top to bottom, most similar left, one block per seed; the first "
                f"column is the init-text token the row started from; red tokens occur in the init text.",
                sub, fig, show_table=False))
    res.outputs.append(Output("nearest_summary", "nearest", "How much of the init text survives",
                              "Per task: share of rows whose top-1 token is still the row's init token, share of "
                              "top-k tokens that occur in the init text, mean top-1 cosine.", stats))
    return top1


def figures_output(name, section, title, text, data, fig, show_table=True) -> Output:
    return Output(name=name, section=section, title=title, text=text, data=data, figure=fig, show_table=show_table)


def _stochasticity(res: Results, prompts, eff, init, norm, tasks, labels, seeds, opt: Options) -> None:
    raw_n = geometry.prompt_norms([p.prompt for p in prompts])
    eff_n = geometry.prompt_norms(eff)
    per_prompt = pd.DataFrame({
        "task": labels, "seed": seeds, "num_tokens": raw_n["num_tokens"],
        "frobenius_raw": raw_n["frobenius"], "per_token_raw": raw_n["per_token"],
        "frobenius_effective": eff_n["frobenius"], "per_token_effective": eff_n["per_token"],
        "drift_raw": [geometry.prompt_distance(p.prompt, init[p.task]) if init.get(p.task) is not None
                      else np.nan for p in prompts],
        "drift_effective": [geometry.prompt_distance(e, geometry.effective(init[p.task], norm))
                            if init.get(p.task) is not None else np.nan for p, e in zip(prompts, eff)],
    })
    cols = ["frobenius_raw", "per_token_raw", "frobenius_effective", "per_token_effective", "drift_raw",
            "drift_effective"]
    g = per_prompt.groupby("task", sort=False)
    table1 = pd.DataFrame({"task": tasks})
    table1["num_tokens"] = [int(per_prompt.loc[per_prompt.task == t, "num_tokens"].iloc[0]) for t in tasks]
    table1["num_seeds"] = [int((per_prompt.task == t).sum()) for t in tasks]
    for c in cols:
        table1[f"{c}_mean"] = [g.get_group(t)[c].mean() for t in tasks]
        # ddof=0: numpy's default, the variance across seeds as most likely computed for the paper's Table 1
        table1[f"{c}_var"] = [g.get_group(t)[c].var(ddof=0) for t in tasks]
    wsc_cb = None
    if {"wsc", "cb"} <= set(tasks):
        r = table1.set_index("task")
        wsc_cb = {
            "frobenius_raw_ratio": float(r.loc["wsc", "frobenius_raw_mean"] / r.loc["cb", "frobenius_raw_mean"]),
            "sqrt_length_ratio": float(np.sqrt(r.loc["wsc", "num_tokens"] / r.loc["cb", "num_tokens"])),
            "per_token_raw_ratio": float(r.loc["wsc", "per_token_raw_mean"] / r.loc["cb", "per_token_raw_mean"]),
            "paper_ratio": 135.3 / 119.2,
        }
    res.summary["table1"] = table1.to_dict(orient="records")
    res.summary["wsc_cb_norm_ratio"] = wsc_cb
    res.outputs.append(Output(
        "table1_norms", "stochasticity", "Table 1: norm and variance of the prompts per task",
        "Mean over seeds and variance across seeds (ddof=0) of the Frobenius norm (paper), the per-token norm "
        "||P||_F / sqrt(n) (prompt lengths differ by task), the same after the input LayerNorm, and the drift "
        "||P - P_init||_F from the init-text prompt."
        + (f" WSC/CB raw norm ratio {wsc_cb['frobenius_raw_ratio']:.3f} against sqrt(n_WSC/n_CB) = "
           f"{wsc_cb['sqrt_length_ratio']:.3f} (paper: {wsc_cb['paper_ratio']:.3f}); per-token ratio "
           f"{wsc_cb['per_token_raw_ratio']:.3f}." if wsc_cb else ""), table1))
    means = per_prompt.groupby("task", sort=False)[cols].agg(["mean", "std"])
    means.columns = [f"{a}_{b}" for a, b in means.columns]
    means = means.reindex(tasks).reset_index()
    fig = figures.bars_figure([
        {"data": means, "category": "task", "title": "Frobenius norm per prompt (paper's Table 1)",
         "ylabel": "||P||_F", "series": [("frobenius_raw_mean", "raw"), ("frobenius_effective_mean",
                                                                       "after input LayerNorm")],
         "errors": {"frobenius_raw_mean": "frobenius_raw_std", "frobenius_effective_mean": "frobenius_effective_std"},
         "dots": per_prompt.rename(columns={"frobenius_raw": "frobenius_raw_mean",
                                            "frobenius_effective": "frobenius_effective_mean"})},
        {"data": means, "category": "task", "title": "Per-token norm ||P||_F / sqrt(n)", "ylabel": "norm per row",
         "series": [("per_token_raw_mean", "raw"), ("per_token_effective_mean", "after input LayerNorm")],
         "errors": {"per_token_raw_mean": "per_token_raw_std", "per_token_effective_mean": "per_token_effective_std"},
         "dots": per_prompt.rename(columns={"per_token_raw": "per_token_raw_mean",
                                            "per_token_effective": "per_token_effective_mean"})},
    ])
    res.outputs.append(figures_output(
        "norms", "stochasticity", "Prompt norms, raw and effective",
        "Bars: mean over seeds (error bar: standard deviation), dots: seeds. The raw Frobenius norm grows with "
        "the number of rows; per token and after the LayerNorm the tasks can be compared.", per_prompt, fig))

    maps, coords = [], pd.DataFrame({"task": labels, "seed": seeds})
    spaces = [("raw", [p.prompt for p in prompts])] + ([("effective", eff)] if norm is not None else [])
    perplexity = geometry.tsne_perplexity(len(prompts))
    for space, mats in spaces:
        if len(prompts) >= 3:
            d = geometry.distance_matrix(mats, opt.distance)
            xy = geometry.tsne_map(d, seed=opt.seed, perplexity=perplexity)
            coords[f"tsne_{space}_x"], coords[f"tsne_{space}_y"] = xy[:, 0], xy[:, 1]
            maps.append((f"t-SNE, {space} prompts", xy, f"perplexity {perplexity:g}, Frobenius distances "
                                                         f"({opt.distance})"))
        feats, m = geometry.common_length_features(mats)
        xy, ratio = geometry.pca_map(feats)
        coords[f"pca_{space}_x"], coords[f"pca_{space}_y"] = xy[:, 0], xy[:, 1]
        maps.append((f"PCA, {space} prompts", xy, f"first {m} rows flattened; PC1 {ratio[0]:.0%}, "
                                                  f"PC2 {ratio[1]:.0%} of variance"))
    res.outputs.append(figures_output(
        "prompt_maps", "stochasticity", "Figure 6: every prompt in two dimensions",
        f"Each point is one prompt, coloured by task, the seeds of a task joined. t-SNE (perplexity "
        f"{perplexity:g}, valid for {len(prompts)} points) runs on the prompt distance matrix, so prompts of "
        f"different lengths are compared as in the distance section; PCA needs equal-length vectors and uses "
        f"the first rows common to all prompts. t-SNE distances between clusters are not meaningful; PCA's are. "
        f"Top: raw rows (the paper); bottom: after the input LayerNorm.", coords, figures.prompt_maps_figure(
            maps, labels, seeds, tasks), show_table=False))


def _distances(res: Results, prompts, eff, tasks, labels, seeds, opt: Options) -> dict[str, pd.DataFrame]:
    raw = [p.prompt for p in prompts]
    mats = {
        "frobenius_raw": geometry.distance_matrix(raw, opt.distance),
        "frobenius_effective": geometry.distance_matrix(eff, opt.distance),
        "per_row_raw": geometry.distance_matrix(raw, opt.distance, per_row=True),
        "per_row_effective": geometry.distance_matrix(eff, opt.distance, per_row=True),
    }
    task_mats = {k: geometry.task_means(v, labels, tasks) for k, v in mats.items()}
    long = pd.concat([m.stack().rename("distance").reset_index().assign(measure=k)
                      for k, m in task_mats.items()], ignore_index=True)
    pairs = None
    for k, v in mats.items():
        t = geometry.pair_table(v, labels, seeds, k)
        pairs = t if pairs is None else pairs.merge(t, on=["task_a", "seed_a", "task_b", "seed_b"])
    within = []
    for task in tasks:
        sub = pairs[(pairs.task_a == task) & (pairs.task_b == task)] if pairs is not None and len(pairs) else []
        for k in mats:
            vals = sub[k].to_numpy() if len(sub) else np.array([])
            within.append({"task": task, "measure": k, "num_pairs": int(vals.size),
                           "mean": float(vals.mean()) if vals.size else np.nan,
                           "min": float(vals.min()) if vals.size else np.nan,
                           "max": float(vals.max()) if vals.size else np.nan,
                           "cv": float(vals.std() / vals.mean()) if vals.size and vals.mean() else np.nan})
    within = pd.DataFrame(within)
    method = ("over the common length: ||A[:m] - B[:m]||_F with m = min(n_A, n_B)" if opt.distance == "truncate"
              else "the shorter prompt padded with zero rows to the longer one's length")
    res.meta["distance_definition"] = method
    res.summary["distances"] = {k: m.to_dict() for k, m in task_mats.items()}
    res.summary["distances_method"] = method
    txt = {k: m.map(lambda v: f"{v:.3g}") for k, m in task_mats.items()}
    fig = figures.heatmaps_figure([
        ("Frobenius distance, raw (paper's Figure 7)", _upper(task_mats["frobenius_raw"]),
         _upper(txt["frobenius_raw"])),
        ("Frobenius distance, after input LayerNorm", _upper(task_mats["frobenius_effective"]),
         _upper(txt["frobenius_effective"])),
        ("Per-row distance (/ sqrt m), raw", _upper(task_mats["per_row_raw"]), _upper(txt["per_row_raw"])),
        ("Per-row distance (/ sqrt m), after input LayerNorm", _upper(task_mats["per_row_effective"]),
         _upper(txt["per_row_effective"])),
    ], colorbar_label="distance (lower = more similar)")
    res.outputs.append(figures_output(
        "distances", "distances", "Figure 7: distance between the prompts of two tasks",
        f"Mean Frobenius distance over all seed pairs of two tasks; the diagonal is the mean over the distinct "
        f"seed pairs of one task (within-task spread). Prompts of different lengths are compared {method}. "
        f"Per-row distances divide by sqrt(m) so task pairs with different m compare.", long, fig,
        show_table=False))
    res.outputs.append(Output(
        "within_task", "distances", "Within-task distances (are the seeds equidistant?)",
        "For each task and measure: the distances between its seed pairs (cv = std / mean; a small cv means the "
        "seeds are nearly equidistant, the paper's claim).", within))
    res.outputs.append(Output("distance_pairs", "distances", "Every prompt pair",
                              "Distance between every two prompts, all measures.",
                              pairs if pairs is not None else pd.DataFrame(), show_table=False))
    return mats


def _upper(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    out.index = [str(i).upper() for i in out.index]
    out.columns = [str(c).upper() for c in out.columns]
    out.index.name, out.columns.name = "source", "target"
    return out


def _transfer(res: Results, study: Study, tasks, opt: Options) -> pd.DataFrame:
    per_seed, summary = transfer.transfer_tables(study, opt.n_boot, opt.seed)
    res.summary["transfer"] = summary.to_dict(orient="records")
    if summary.empty:
        res.meta["notes"].append("no transfer results: the study has no transfer runs and its train runs no "
                                 "predictions")
        return summary
    panels = []
    for metric, name in (("exact_match", "exact match"), ("rank_accuracy", "rank accuracy")):
        mean = transfer.summary_matrix(summary, metric, "delta_mean", tasks)
        std = transfer.summary_matrix(summary, metric, "delta_std", tasks)
        lo = transfer.summary_matrix(summary, metric, "ci_low", tasks)
        hi = transfer.summary_matrix(summary, metric, "ci_high", tasks)
        base = transfer.summary_matrix(summary, metric, "baseline", tasks)
        text = mean.copy().astype(object)
        for a in tasks:
            for b in tasks:
                m = mean.loc[a, b]
                if np.isfinite(m):
                    sd = f"±{std.loc[a, b]:.2f}" if np.isfinite(std.loc[a, b]) else ""
                    ci = f"\n[{lo.loc[a, b]:+.2f}, {hi.loc[a, b]:+.2f}]" if np.isfinite(lo.loc[a, b]) else ""
                    text.loc[a, b] = f"{m:+.2f}{sd}{ci}"
        cols = [f"{b.upper()}\n(none: {base[b].dropna().iloc[0]:.2f})" if base[b].notna().any() else b.upper()
                for b in tasks]
        values, text = _upper(mean), _upper(text)
        values.columns = text.columns = cols
        values.columns.name = text.columns.name = "target (no-prompt accuracy)"
        panels.append((f"Δ {name}: source prompt on target vs no prompt", values, text))
    fig = figures.heatmaps_figure(panels, cmap="RdBu", center=0.0, colorbar_label="accuracy change")
    res.outputs.append(figures_output(
        "transfer", "transfer", "Figure 8: zero-shot transfer",
        f"Row A, column B: accuracy of A's prompts on B's validation set minus B's no-prompt accuracy; mean ± "
        f"standard deviation over A's seeds, and the 95% bootstrap interval of the mean over B's examples "
        f"({opt.n_boot} resamples; A's seeds held fixed). With few examples (CB: 56, one example = 1.8 points) the "
        f"intervals are wide: a cell whose interval contains 0 shows no measurable transfer.", summary, fig))
    res.outputs.append(Output("transfer_per_seed", "transfer", "Transfer per seed",
                              "Every (source seed, target, metric): accuracy, no-prompt accuracy, change, and the "
                              "runs they come from.", per_seed, show_table=False))
    return summary


def _pairs(res: Results, model, prompts, eff, init, norm, tasks, labels, dist, summary, opt: Options
           ) -> pd.DataFrame:
    """One row per ordered task pair (source != target): every predictor and the transfer gains."""
    preds = {k: geometry.task_means(v, labels, tasks) for k, v in dist.items()}
    preds["spot_cosine_raw"] = geometry.task_means(predictors.spot_similarity([p.prompt for p in prompts]),
                                                   labels, tasks)
    preds["spot_cosine_effective"] = geometry.task_means(predictors.spot_similarity(eff), labels, tasks)
    try:
        states = predictors.activation_states(model, [p.prompt for p in prompts])
        preds["ffn_overlap"] = geometry.task_means(predictors.activation_overlap(states), labels, tasks)
        res.meta["ffn_neurons"] = int(states.shape[1])
    except ValueError as err:
        res.meta["notes"].append(f"activated-neuron overlap not computed: {err}")
    if all(init.get(t) is not None for t in tasks):
        init_list = [init[t] for t in tasks]
        preds["init_text_distance"] = pd.DataFrame(geometry.distance_matrix(init_list, opt.distance),
                                                   index=tasks, columns=tasks)
    rows = []
    for a in tasks:
        for b in tasks:
            if a == b:
                continue
            row = {"source": a, "target": b, **{k: float(m.loc[a, b]) for k, m in preds.items()}}
            for metric in ("exact_match", "rank_accuracy"):
                hit = summary[(summary.source == a) & (summary.target == b) & (summary.metric == metric)] \
                    if len(summary) else summary
                row[f"delta_{metric}"] = float(hit["delta_mean"].iloc[0]) if len(hit) else np.nan
            rows.append(row)
    return pd.DataFrame(rows)


PREDICTORS = {  # column -> (label, sign expected if it predicts transfer)
    "frobenius_raw": ("Frobenius distance, raw (paper)", -1),
    "frobenius_effective": ("Frobenius distance, after input LayerNorm", -1),
    "per_row_raw": ("per-row distance, raw", -1),
    "per_row_effective": ("per-row distance, after input LayerNorm", -1),
    "spot_cosine_raw": ("SPoT cosine of mean-pooled prompts, raw", 1),
    "spot_cosine_effective": ("SPoT cosine, after input LayerNorm", 1),
    "ffn_overlap": ("activated FFN neuron overlap (Su et al.)", 1),
    "init_text_distance": ("distance between the init-text prompts (confound)", -1),
}


def _correlations(res: Results, pairs: pd.DataFrame, tasks) -> None:
    if pairs.empty:
        return
    stats = []
    for col, (label, sign) in PREDICTORS.items():
        if col not in pairs:
            continue
        for gain in ("delta_exact_match", "delta_rank_accuracy"):
            c = transfer.correlation(pairs[col], pairs[gain])
            stats.append({"predictor": col, "description": label, "gain": gain, "expected_sign": sign, **c})
    stats = pd.DataFrame(stats)
    res.summary["correlations"] = stats.to_dict(orient="records")
    for r in stats.itertuples():
        res.metrics[f"spearman_{r.predictor}_{r.gain}"] = r.spearman_r

    def corr(col, gain):
        return stats[(stats.predictor == col) & (stats.gain == gain)].iloc[0].to_dict()

    panels = [(col, gain, f"{PREDICTORS[col][0]}\nvs Δ {gain[6:].replace('_', ' ')}", corr(col, gain))
              for gain in ("delta_exact_match", "delta_rank_accuracy")
              for col in ("frobenius_raw", "frobenius_effective")]
    main = stats[stats.predictor.isin(["frobenius_raw", "frobenius_effective"])]
    res.outputs.append(figures_output(
        "correlation", "correlation", "Distance against transfer gain",
        f"Each point is an ordered task pair A→B (A ≠ B, n = {len(pairs)}; colour = source A, marker = target B): "
        f"the mean distance between A's and B's prompts against the mean accuracy change of A's prompts on B. Spearman and Pearson correlations with "
        f"two-sided p-values; a negative correlation supports the paper's claim (closer prompts transfer better). "
        f"The points share tasks and are not independent, so p-values are optimistic.",
        pairs, figures.scatter_figure(pairs, panels, tasks, ncols=2)))
    res.outputs.append(Output("correlation_stats", "correlation", "Correlation of distance and transfer gain", "",
                              main.drop(columns=["description"])))
    cols = [c for c in PREDICTORS if c in pairs]
    res.outputs.append(figures_output(
        "predictors", "predictors", "Transferability predictors side by side",
        "Spearman (and Pearson) correlation of each predictor with the transfer gain over the ordered task "
        "pairs. Distances should correlate negatively, similarities positively (expected sign). SPoT: cosine of "
        "mean-pooled prompts (Vu et al. 2022). FFN overlap: cosine of the 0/1 activation states of every "
        "feed-forward neuron at the prompt's last position, the prompt alone as input (Su et al. 2022). "
        "init_text_distance is the distance between the tasks' starting prompts: if it predicts as well as the "
        "trained prompts do, the distances mostly reflect the init texts, not what training learned.",
        stats, figures.correlation_bars_figure(stats, {c: v[0] for c, v in PREDICTORS.items()})))
    panels = [(c, "delta_exact_match", PREDICTORS[c][0], corr(c, "delta_exact_match")) for c in cols]
    res.outputs.append(figures_output(
        "predictor_scatter", "predictors", "Every predictor against the exact-match transfer gain",
        "One panel per predictor; each point an ordered task pair (colour = source, marker = target).", pairs,
        figures.scatter_figure(pairs, panels, tasks), show_table=False))


def _faithfulness(res: Results, prompts, embedding, top1, model, tokenizer, tasks, opt: Options) -> None:
    from analysis.faithfulness import discretise, faithfulness_table
    from ptray.errors import PtrayError

    variants = {f"nearest_{space}": [discretise(embedding, ids) for ids in id_list]
                for space, id_list in top1.items()}
    t0 = time.perf_counter()
    try:
        table = faithfulness_table(prompts, variants, model, tokenizer, data_dir=opt.data_dir,
                                   batch_size=opt.batch_size)
    except PtrayError as err:
        res.meta["notes"].append(f"faithfulness check not computed: {err}")
        return
    res.meta["faithfulness_seconds"] = round(time.perf_counter() - t0, 1)
    value_cols = [c for c in table.columns if c.endswith(("exact_match", "rank_accuracy"))]
    by_task = table.groupby("task", sort=False)[value_cols].mean().reindex(tasks).reset_index()
    res.summary["faithfulness"] = by_task.to_dict(orient="records")
    for r in by_task.itertuples():
        res.metrics[f"faithfulness_{r.task}_soft_em"] = r.soft_exact_match
        res.metrics[f"faithfulness_{r.task}_nearest_raw_em"] = r.nearest_raw_exact_match
    panels = []
    for metric, name in (("exact_match", "exact match"), ("rank_accuracy", "rank accuracy")):
        series = [(f"soft_{metric}", "soft prompt")] + \
            [(f"{v}_{metric}", v.replace("_", " ") + " token per row") for v in variants] + \
            [(f"init_text_{metric}", "init text (hard)"), (f"no_prompt_{metric}", "no prompt")]
        panels.append({"data": by_task, "category": "task", "title": f"{name}: soft vs discretised prompt",
                       "ylabel": name, "series": series, "dots": table, "ylim": (0, 1)})
    res.outputs.append(figures_output(
        "faithfulness", "faithfulness", "Soft prompt against its nearest-token reading",
        "Accuracy on each task's evaluation examples (those the prompt was selected on) of the soft prompt and of "
        "the hard prompt made of each row's nearest token (raw cosine: the paper's reading; effective: after the "
        "input LayerNorm), with the init text and no prompt for reference. Bars: mean over seeds; dots: seeds.",
        table, figures.bars_figure(panels)))
