"""How faithful is the nearest-token reading? Replace every prompt row by its nearest token's embedding (a
discretised, hard prompt) and compare its accuracy with the soft prompt's, on the same examples.

If the nearest tokens were what the prompt "means", the discretised prompt would keep most of the soft prompt's
accuracy; a large drop says the reading in Figures 2-5 leaves out what the model uses.
"""

from __future__ import annotations

import time

import pandas as pd
import torch

from analysis import figures
from analysis.inputs import Inputs
from analysis.records import PromptRun
from analysis.results import Output, Section


def discretise(embedding: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """The hard prompt [n, hidden] (fp32) made of the embedding rows of ``token_ids`` [n]."""
    return embedding[token_ids.long()].detach().float().clone()


def faithfulness_table(prompts: list[PromptRun], variants: dict[str, list[torch.Tensor]], model, tokenizer,
                       data_dir: str | None = None, batch_size: int = 32, autocast=None) -> pd.DataFrame:
    """Accuracy of each soft prompt and of its discretised variants on its task's evaluation split.

    ``variants[name][i]`` is prompt i's hard version [n_i, hidden]. Each run's ``config.json`` gives the split
    (``eval_split``), ``max_length``, ``max_eval_examples`` and ``data_dir`` (``data_dir`` overrides it), so the
    examples are the ones the prompt was selected on. One row per prompt: ``<variant>_exact_match`` and
    ``<variant>_rank_accuracy`` for ``soft`` and every variant, the recorded soft / init-text / no-prompt numbers.
    """
    from ptray.lm.evaluate import evaluate_on_task

    rows = []
    for i, p in enumerate(prompts):
        cfg = p.config
        kwargs = {"data_dir": data_dir or cfg.get("data_dir"), "split": cfg.get("eval_split", "val"),
                  "max_examples": cfg.get("max_eval_examples"), "max_length": int(cfg.get("max_length", 512)),
                  "batch_size": batch_size, "autocast": autocast}
        row = {"task": p.task, "seed": p.seed, "run_id": p.run_id}
        for name, prompt in [("soft", p.prompt)] + [(v, hard[i]) for v, hard in variants.items()]:
            result, _ = evaluate_on_task(model, tokenizer, p.task, prompt, **kwargs)
            row[f"{name}_exact_match"] = result.exact_match
            row[f"{name}_rank_accuracy"] = result.rank_accuracy
            row["num_examples"] = result.num_examples
        for key in ("exact_match", "rank_accuracy"):
            row[f"recorded_{key}"] = p.metrics.get(key)
            row[f"init_text_{key}"] = p.metrics.get(f"init_text_{key}")
            row[f"no_prompt_{key}"] = p.metrics.get(f"no_prompt_{key}")
        rows.append(row)
    return pd.DataFrame(rows)


def faithfulness_section(*, inputs: Inputs, top1: dict[str, list[torch.Tensor]], model, tokenizer,
                         data_dir: str | None, batch_size: int) -> Section:
    """Soft prompt against its nearest-token reading, for every nearest-token space in ``top1`` (from
    ``analysis.nearest.nearest_section``). A task whose data cannot be read leaves a note instead (PtrayError)."""
    from ptray.errors import PtrayError

    out = Section()
    variants = {f"nearest_{space}": [discretise(inputs.embedding, ids) for ids in id_list]
                for space, id_list in top1.items()}
    t0 = time.perf_counter()
    try:
        table = faithfulness_table(inputs.prompts, variants, model, tokenizer, data_dir=data_dir,
                                   batch_size=batch_size)
    except PtrayError as err:
        out.notes.append(f"faithfulness check not computed: {err}")
        return out
    out.meta["faithfulness_seconds"] = round(time.perf_counter() - t0, 1)
    value_cols = [c for c in table.columns if c.endswith(("exact_match", "rank_accuracy"))]
    by_task = table.groupby("task", sort=False)[value_cols].mean().reindex(inputs.tasks).reset_index()
    out.summary["faithfulness"] = by_task.to_dict(orient="records")
    for r in by_task.itertuples():
        out.metrics[f"faithfulness_{r.task}_soft_em"] = r.soft_exact_match
        out.metrics[f"faithfulness_{r.task}_nearest_raw_em"] = r.nearest_raw_exact_match
    panels = []
    for metric, name in (("exact_match", "exact match"), ("rank_accuracy", "rank accuracy")):
        series = [(f"soft_{metric}", "soft prompt")] + \
            [(f"{v}_{metric}", v.replace("_", " ") + " token per row") for v in variants] + \
            [(f"init_text_{metric}", "init text (hard)"), (f"no_prompt_{metric}", "no prompt")]
        panels.append({"data": by_task, "category": "task", "title": f"{name}: soft vs discretised prompt",
                       "ylabel": name, "series": series, "dots": table, "ylim": (0, 1)})
    out.outputs.append(Output(
        "faithfulness", "faithfulness", "Soft prompt against its nearest-token reading",
        "Accuracy (fraction) on each task's evaluation examples (those the prompt was selected on) of the soft "
        "prompt and of the hard prompt made of each row's nearest token (raw cosine: the paper's reading; "
        "effective: in the effective space, when defined), with the init text and no prompt for reference. "
        "Bars: mean over seeds; dots: seeds.", table, figures.bars_figure(panels)))
    return out
