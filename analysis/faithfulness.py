"""How faithful is the nearest-token reading? Replace every prompt row by its nearest token's input vector (a
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


def discretise(model, token_ids: torch.Tensor) -> torch.Tensor:
    """The hard prompt [n, embed_dim] (fp32, CPU) made of the tokens ``token_ids`` [n]: their input vectors
    (``ptray.lm.families.embed``, Gemma2's embedding scale included), as a prompt of those tokens would enter the
    model. (The nearest-token search that picks the ids compares cosines, which a uniform scale leaves alone.)"""
    from ptray.lm.families import embed

    with torch.no_grad():
        return embed(model, token_ids.long()).detach().float().cpu().clone()


def _settings(p: PromptRun, data_dir: str | None) -> tuple:
    """The evaluation examples of prompt ``p``, as its train run's config.json names them (``data_dir``
    overrides it): (task, data_dir, hub_dataset, split, max_examples, max_length)."""
    from ptray.data.superglue import DEFAULT_HUB_DATASET

    cfg = p.config
    return (p.task, data_dir or cfg.get("data_dir"), cfg.get("hub_dataset") or DEFAULT_HUB_DATASET,
            cfg.get("eval_split", "val"), cfg.get("max_eval_examples"), int(cfg.get("max_length", 512)))


def faithfulness_table(prompts: list[PromptRun], variants: dict[str, list[torch.Tensor]], model, tokenizer,
                       data_dir: str | None = None, batch_size: int = 32, autocast=None) -> pd.DataFrame:
    """Accuracy of each soft prompt and of its discretised variants on its task's evaluation split.

    ``variants[name][i]`` is prompt i's hard version [n_i, embed_dim]. Each run's ``config.json`` gives the split
    (``eval_split``), ``max_length``, ``max_eval_examples`` and ``data_dir`` (``data_dir`` overrides it), so the
    examples are the ones the prompt was selected on. The examples of each (task, settings) are read once and
    every prompt that uses them, soft and hard, is scored in the same passes
    (``ptray.lm.evaluate.evaluate_prompts``: the numbers of one ``evaluate`` per prompt, many prompts per forward).
    One row per prompt, in ``prompts`` order: ``<variant>_exact_match`` and ``<variant>_rank_accuracy`` (fractions)
    for ``soft`` and every variant, ``num_examples``, the recorded soft / init-text / no-prompt numbers.

    Raises:
        PtrayError: a task's examples cannot be read, or its split has no labeled example.
    """
    from ptray.data.batching import encode_all
    from ptray.data.superglue import load_split
    from ptray.data.tasks import get_task
    from ptray.data.tokens import pad_token_id
    from ptray.errors import PtrayError
    from ptray.lm.evaluate import evaluate_prompts

    names = ["soft", *variants]
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(_settings(p, data_dir), []).append(i)
    rows: dict[int, dict] = {}
    for (task_name, ddir, hub, split, max_examples, max_length), members in groups.items():
        task = get_task(task_name)
        data = [d for d in encode_all(task, load_split(task, split, ddir, hub, max_examples), tokenizer, max_length)
                if d.label is not None]
        if not data:
            raise PtrayError(f"task {task_name}: split {split!r} has no labeled example to evaluate on")
        batch = [prompts[i].prompt if name == "soft" else variants[name][i] for i in members for name in names]
        results = evaluate_prompts(model, data, batch, batch_size, pad_token_id(tokenizer), tokenizer.eos_token_id,
                                   autocast=autocast)
        for m, i in enumerate(members):
            p = prompts[i]
            row = {"task": p.task, "seed": p.seed, "run_id": p.run_id}
            for v, name in enumerate(names):
                result = results[m * len(names) + v]
                row[f"{name}_exact_match"] = result.exact_match
                row[f"{name}_rank_accuracy"] = result.rank_accuracy
                row["num_examples"] = result.num_examples
            for key in ("exact_match", "rank_accuracy"):
                row[f"recorded_{key}"] = p.metrics.get(key)
                row[f"init_text_{key}"] = p.metrics.get(f"init_text_{key}")
                row[f"no_prompt_{key}"] = p.metrics.get(f"no_prompt_{key}")
            rows[i] = row
    return pd.DataFrame([rows[i] for i in range(len(prompts))])


def faithfulness_section(*, inputs: Inputs, top1: dict[str, list[torch.Tensor]], model, tokenizer,
                         data_dir: str | None, batch_size: int) -> Section:
    """Soft prompt against its nearest-token reading, for every nearest-token space in ``top1`` (from
    ``analysis.nearest.nearest_section``). A task whose data cannot be read leaves a note instead (PtrayError)."""
    from ptray.errors import PtrayError

    out = Section()
    variants = {f"nearest_{space}": [discretise(model, ids) for ids in id_list] for space, id_list in top1.items()}
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
