"""From a Study (records) and the frozen model to every table, figure and number of the report.

``compute`` runs the sections in order; each section is a pure function in its own file (the model's forward
passes aside) that returns a ``Section``: figures with the numbers they draw, tables, summary values, notes.

| section | file |
|---|---|
| the plan and what was found (first: planned, found, missing runs) | ``analysis/coverage.py`` |
| learning curves and accuracy floors (majority class, no prompt, init text) | ``analysis/learning.py`` |
| nearest tokens (Figures 2-5) | ``analysis/nearest.py`` |
| stochasticity: Table 1, norms, Figure 6 | ``analysis/stochasticity.py`` |
| distances (Figure 7) | ``analysis/distances.py`` |
| zero-shot transfer (Figure 8) | ``analysis/transfer.py`` |
| distance vs transfer (Mantel test) | ``analysis/correlation.py`` |
| other transferability predictors | ``analysis/predictors.py`` |
| conditions compared (a study with conditions) | ``analysis/conditions.py`` |
| a search: searched values, stopped trials, best value | ``analysis/search.py`` |
| SPoT: gain from another task's prompt, its predictors | ``analysis/spot.py`` |
| faithfulness of the nearest-token reading | ``analysis/faithfulness.py`` |
| the report files | ``analysis/report.py`` |

A study with conditions, SPoT runs or a search: the paper's sections read one condition (``AnalysisOptions
.condition``, default the first declared), without SPoT runs, and in a search the best finished trial per task and
seed (``views.paper_view``); the conditions, search and SPoT sections read the whole study.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import contextmanager

from analysis import (
    claims,
    conditions,
    correlation,
    coverage,
    distances,
    geometry,
    learning,
    nearest,
    predictors,
    search,
    spot,
    stochasticity,
    transfer,
    views,
)
from analysis.faithfulness import faithfulness_section
from analysis.inputs import prepare
from analysis.records import Study
from analysis.results import AnalysisOptions, Results

log = logging.getLogger("ptray.analysis")

__all__ = ["AnalysisOptions", "Results", "compute", "recorded_inputs"]


@contextmanager
def _timed(seconds: dict[str, float], name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = round(time.perf_counter() - t0, 3)
        log.info("%s: %.1f s", name, seconds[name])


def recorded_inputs(opt: AnalysisOptions, model, num_points: int) -> dict:
    """Every input that changes a number of the report, for ``analysis.json`` (``meta.inputs``): the options, the
    seed of each random step (bootstraps, t-SNE of ``num_points`` distinct prompts: its perplexity, None where no
    t-SNE runs, as below 3 distinct prompts or with all coinciding) with its sizes, the model (class, type,
    dtype, parameter count; ``analysis.runner.run`` adds its name and device) and the code and library versions."""
    from importlib.metadata import PackageNotFoundError, version

    from ptray.lm.families import effective_definition
    from ptray.versions import code_version, compute_settings, library_versions

    libs = library_versions()
    for name in ("numpy", "scipy", "scikit-learn", "pandas"):
        try:
            libs[f"{name}_version"] = version(name)
        except PackageNotFoundError:
            libs[f"{name}_version"] = "not installed"
    param = next(model.parameters())
    return {
        "options": dataclasses.asdict(opt),
        "seed": opt.seed,
        "bootstrap": {"seed": opt.seed, "n_boot": opt.n_boot, "level": 0.95},
        "mantel": {"seed": opt.seed, "max_exact": correlation.MANTEL_MAX_EXACT,
                   "n_random": correlation.MANTEL_RANDOM},
        "tsne": {"seed": opt.seed, "perplexity": geometry.tsne_perplexity(num_points) if num_points >= 3 else None,
                 "method": "exact", "init": "random"},
        "model": {"name": None, "class": type(model).__name__,
                  "model_type": getattr(model.config, "model_type", None), "dtype": str(param.dtype).removeprefix(
                      "torch."), "num_parameters": sum(p.numel() for p in model.parameters()),
                  "effective_prompt": effective_definition(model)},
        "versions": {"code": code_version(), **libs},
        "compute": compute_settings(),
    }


def compute(study: Study, model, tokenizer, options: AnalysisOptions | None = None, notes: list[str] | None = None
            ) -> Results:
    """Every analysis, in report order: the plan against the runs found (``analysis.coverage``), the learning
    curves and accuracy floors, nearest tokens,
    norms and maps, distances, transfer, distance vs transfer, predictors, faithfulness. ``notes`` (from loading
    the study) start the report's notes.

    Any number of tasks and seeds is analysed, one prompt included: what needs more (a spread across seeds, a
    distance between prompts, a map, a test over task pairs) is n/a with a note saying why.
    ``meta["inputs"]`` records every input that changes a number (``recorded_inputs``), ``meta["seconds"]`` the
    wall time of each section (seconds).

    Raises:
        PtrayError: the prompts do not fit the model (``analysis.inputs.prepare``).
    """
    opt = options or AnalysisOptions()
    seconds: dict[str, float] = {}
    full = study
    planned = coverage.coverage_section(full)  # of the whole experiment, before any view narrows it
    study, view_notes, view_meta = views.paper_view(full, opt.condition)
    with _timed(seconds, "prepare"):
        inputs = prepare(study, model, tokenizer)
    with _timed(seconds, "distance_matrices"):
        mats = distances.distance_matrices(inputs, opt.distance)  # every [P, P] distance, computed once
    distinct = int(geometry.coinciding(mats["frobenius_raw"]).max()) + 1  # the points t-SNE maps
    tasks = inputs.tasks
    first = inputs.prompts[0]
    res = Results(meta={
        "experiment": study.experiment, "study": study.study, "model": first.config.get("model"),
        "num_prompts": len(inputs.prompts), "tasks": tasks,
        "seeds": {t: sorted(p.seed for p in inputs.prompts if p.task == t) for t in tasks},
        "num_tokens": {t: next(p.num_tokens for p in inputs.prompts if p.task == t) for t in tasks},
        "init_text": {t: next(p.config.get("init_text") for p in inputs.prompts if p.task == t) for t in tasks},
        "hidden_size": int(inputs.embedding.shape[1]), "vocab_size": int(inputs.embedding.shape[0]),
        "effective_prompt": inputs.effective_name,
        "distance_method": opt.distance, "top_k": opt.top_k, "n_boot": opt.n_boot, "seed": opt.seed,
        "num_transfer_runs": sum(e.kind == "transfer" for e in full.evals),
        "num_baseline_runs": sum(e.kind == "baseline" for e in full.evals),
        "inputs": recorded_inputs(opt, model, distinct),
        "seconds": seconds,
        "notes": list(notes or []) + view_notes,
    })
    res.add(planned)
    if view_meta["conditions"]:
        res.meta.update(condition=view_meta["condition"], conditions=view_meta["conditions"])
    res.meta["inputs"]["model"]["name"] = res.meta["model"]
    if inputs.effective is None:
        res.meta["notes"].append("the effective prompt is not defined for this model: every effective number is "
                                 "n/a")

    with _timed(seconds, "learning"):
        every = views.best_trials(full.prompts) if views.is_search(full) else full.prompts  # each condition
        every_task = [*tasks, *sorted({p.task for p in every} - set(tasks))]
        res.add(learning.learning_section(prompts=every, tasks=every_task, data_dir=opt.data_dir))
    with _timed(seconds, "nearest"):
        section, top1 = nearest.nearest_section(inputs=inputs, tokenizer=tokenizer, top_k=opt.top_k,
                                                chunk=opt.chunk)
        res.add(section)
    with _timed(seconds, "stochasticity"):
        res.add(stochasticity.stochasticity_section(inputs=inputs, distances=mats, distance=opt.distance,
                                                    seed=opt.seed))
    with _timed(seconds, "distances"):
        res.add(distances.distances_section(inputs=inputs, matrices=mats, distance=opt.distance,
                                          seed=opt.seed))
    with _timed(seconds, "transfer"):
        section, summary = transfer.transfer_section(study=study, tasks=tasks, n_boot=opt.n_boot, seed=opt.seed)
        res.add(section)
    with _timed(seconds, "predictors"):
        preds, section = predictors.predictor_matrices(
            inputs=inputs, model=model, distances=mats, distance=opt.distance,
            rows_compared=distances.rows_compared_matrix(inputs, opt.distance))
        res.add(section)
    if summary.empty or len(tasks) < 3:
        res.meta["notes"].append(
            f"distance vs transfer and the predictors' correlations not tested: they need transfer results and 3 "
            f"or more tasks (a Mantel test over task pairs); this study has {len(tasks)} task"
            f"{'s' if len(tasks) != 1 else ''}" + (" and no transfer results" if summary.empty else ""))
    else:
        with _timed(seconds, "correlation"):
            gains = {f"delta_{m}": transfer.summary_matrix(summary, m, "delta_mean", tasks) for m in transfer.METRICS}
            pairs = correlation.task_pair_table(preds, gains, tasks)
            stats = correlation.correlation_table(preds, gains, tasks, seed=opt.seed)
            res.add(correlation.correlation_section(pairs=pairs, stats=stats, tasks=tasks,
                                                    distance_definition=res.meta["distance_definition"]))
            res.add(predictors.predictors_section(pairs=pairs, stats=stats, tasks=tasks))

    if full.conditions:
        with _timed(seconds, "conditions"):
            res.add(conditions.conditions_section(study=full, n_boot=opt.n_boot, seed=opt.seed,
                                                  distance=opt.distance, effective=conditions.effective_map(model)))
            res.meta["inputs"]["conditions_test"] = res.summary["conditions_test"]
    if full.trials and views.is_search(full):
        with _timed(seconds, "search"):
            res.add(search.search_section(study=full))
    if any(views.is_spot(p) for p in full.prompts):
        with _timed(seconds, "spot"):
            res.add(spot.spot_section(study=full, tasks=tasks, n_boot=opt.n_boot, seed=opt.seed,
                                      condition=res.meta.get("condition"), predictors=preds, zero_shot=summary))
    if opt.faithfulness:
        with _timed(seconds, "faithfulness"):
            res.add(faithfulness_section(inputs=inputs, top1=top1, model=model, tokenizer=tokenizer,
                                         data_dir=opt.data_dir, batch_size=opt.batch_size))
    else:
        res.meta["notes"].append("faithfulness check skipped (--no-faithfulness)")
    with _timed(seconds, "claims"):
        res.add(claims.claims_section(res))
    res.summary["meta"] = res.meta
    return res
