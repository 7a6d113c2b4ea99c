"""From a Study (records) and the frozen model to every table, figure and number of the report.

``compute`` runs the sections in order; each section is a pure function in its own file (the model's forward
passes aside) that returns a ``Section``: figures with the numbers they draw, tables, summary values, notes.

| section | file |
|---|---|
| nearest tokens (Figures 2-5) | ``analysis/nearest.py`` |
| stochasticity: Table 1, norms, Figure 6 | ``analysis/stochasticity.py`` |
| distances (Figure 7) | ``analysis/distances.py`` |
| zero-shot transfer (Figure 8) | ``analysis/transfer.py`` |
| distance vs transfer (Mantel test) | ``analysis/correlation.py`` |
| other transferability predictors | ``analysis/predictors.py`` |
| faithfulness of the nearest-token reading | ``analysis/faithfulness.py`` |
| the report files | ``analysis/report.py`` |
"""

from __future__ import annotations

import logging

from analysis import correlation, distances, nearest, predictors, stochasticity, transfer
from analysis.faithfulness import faithfulness_section
from analysis.inputs import prepare
from analysis.records import Study
from analysis.results import Options, Results

log = logging.getLogger("ptray.analysis")

__all__ = ["Options", "Results", "compute"]


def compute(study: Study, model, tokenizer, options: Options | None = None, notes: list[str] | None = None
            ) -> Results:
    """Every analysis, in report order: nearest tokens, norms and maps, distances, transfer, distance vs
    transfer, predictors, faithfulness. ``notes`` (from loading the study) start the report's notes.

    Raises PtrayError when the prompts do not fit the model (``analysis.inputs.prepare``).
    """
    opt = options or Options()
    inputs = prepare(study, model, tokenizer)
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
        "distance_method": opt.distance, "top_k": opt.top_k, "n_boot": opt.n_boot,
        "num_transfer_runs": sum(e.kind == "transfer" for e in study.evals),
        "num_baseline_runs": sum(e.kind == "baseline" for e in study.evals),
        "notes": list(notes or []),
    })
    if inputs.effective is None:
        res.meta["notes"].append("the effective prompt is not defined for this model: every effective number is "
                                 "n/a")

    section, top1 = nearest.nearest_section(inputs=inputs, tokenizer=tokenizer, top_k=opt.top_k, chunk=opt.chunk)
    res.add(section)
    log.info("nearest tokens: %s s", section.meta["nearest_seconds"])
    mats = distances.distance_matrices(inputs, opt.distance)  # every [P, P] distance, computed once
    res.add(stochasticity.stochasticity_section(inputs=inputs, distances=mats, distance=opt.distance,
                                                seed=opt.seed))
    res.add(distances.distances_section(inputs=inputs, matrices=mats, distance=opt.distance))
    section, summary = transfer.transfer_section(study=study, tasks=tasks, n_boot=opt.n_boot, seed=opt.seed)
    res.add(section)

    preds, section = predictors.predictor_matrices(
        inputs=inputs, model=model, distances=mats, distance=opt.distance,
        rows_compared=distances.rows_compared_matrix(inputs, opt.distance))
    res.add(section)
    if summary.empty or len(tasks) < 3:
        res.meta["notes"].append("distance vs transfer not tested: it needs transfer results and 3 or more tasks")
    else:
        gains = {f"delta_{m}": transfer.summary_matrix(summary, m, "delta_mean", tasks) for m in transfer.METRICS}
        pairs = correlation.pair_table(preds, gains, tasks)
        stats = correlation.correlation_table(preds, gains, tasks, seed=opt.seed)
        res.add(correlation.correlation_section(pairs=pairs, stats=stats, tasks=tasks,
                                                distance_definition=res.meta["distance_definition"]))
        res.add(predictors.predictors_section(pairs=pairs, stats=stats, tasks=tasks))

    if opt.faithfulness:
        res.add(faithfulness_section(inputs=inputs, top1=top1, model=model, tokenizer=tokenizer,
                                     data_dir=opt.data_dir, batch_size=opt.batch_size))
    else:
        res.meta["notes"].append("faithfulness check skipped (--no-faithfulness)")
    res.summary["meta"] = res.meta
    return res
