"""What a study prints: the plan before it starts (also ``--dry-run``) and the summary at the end, read back from
MLflow (the source of truth, also after ``--resume``)."""

from __future__ import annotations

import shlex
from typing import Any

from ptray import layout
from ptray.config import DEFAULT_GPU_GROUP_SIZE, DEFAULT_GPUS_PER_TRIAL, Options, Plan, optimizer_settings
from ptray.study import tracking
from ptray.study.paths import study_path, tune_path


def describe(plan: Plan, opts: Options, uri: str, storage: str, experiment: str, new: bool,
             gpus: float | None = None) -> str:
    """The plan in a few lines: trials, resources, where results go."""
    if gpus is None:
        gpus_text = (f"{opts.gpus_per_trial:g} GPU" if opts.gpus_per_trial is not None else
                     f"{DEFAULT_GPUS_PER_TRIAL:g} GPU if the cluster has GPUs, else none")
    else:
        gpus_text = f"{gpus:g} GPU"
    model = "a tiny random BLOOM built on the fly" if plan.tiny_model else plan.train.model
    cfg = plan.train
    subset = ""
    if cfg.max_train_examples or cfg.max_eval_examples:
        subset = f", first {cfg.max_train_examples or 'all'} train / {cfg.max_eval_examples or 'all'} eval examples"
    names = [layout.train_run_name(t, s) for t, s in plan.trials]
    ray_text = f"the cluster at {opts.address}" if opts.address else "embedded (started by this script)"
    return "\n".join([
        f"study {plan.study!r} ({'new' if new else 'resume'}{', smoke' if plan.smoke else ''})",
        f"  ray        {ray_text}",
        f"  model      {model}",
        f"  data       {cfg.data_dir or 'the Hugging Face Hub (aps/super_glue)'}",
        f"  training   {len(plan.trials)} trials ({', '.join(plan.tasks)} x seeds "
        f"{', '.join(map(str, plan.seeds))}), each {opts.cpus_per_trial:g} CPU + {gpus_text}; up to "
        f"{cfg.max_epochs} epochs (patience {cfg.patience}), {cfg.optimizer} lr "
        f"{optimizer_settings(cfg.optimizer, cfg.lr)['lr']:g}, batch {cfg.batch_size}, "
        f"max length {cfg.max_length}{subset}; "
        f"{opts.max_failures} retries",
        f"             {' '.join(names)}",
        f"  groups     {_groups_text(plan)}",
        f"  transfer   {plan.num_evaluations} evaluations ({len(plan.trials)} prompts x {len(plan.tasks)} tasks + "
        f"{len(plan.tasks)} no-prompt baselines), one Ray task per target task, same resources",
        f"  MLflow     experiment {experiment!r} at {uri}",
        f"  Tune       {tune_path(storage, plan.study)} (checkpoint every epoch)",
        f"  analysis   {'python -m analysis --experiment ' + experiment if opts.analysis else 'off'}",
    ])


def _groups_text(plan: Plan) -> str:
    """How the prompts are packed into Tune trials (``--group-size``)."""
    def show(size: int) -> str:
        groups = plan.groups(size)
        return f"{len(groups)} trials: " + " ".join(
            "[" + " ".join(layout.train_run_name(t, s) for t, s in g) + "]" for g in groups)

    if plan.group_size is None:
        return (f"auto: one prompt per trial on CPUs; with GPUs {DEFAULT_GPU_GROUP_SIZE} prompts per trial "
                f"(one GPU each), {show(DEFAULT_GPU_GROUP_SIZE)}")
    if plan.group_size == 1:
        return "one prompt per trial (--group-size N trains N together on one model)"
    return f"{plan.group_size} prompts per trial, trained together on one model, {show(plan.group_size)}"


def summarize(mc, exp_id: str, plan: Plan) -> dict[str, Any]:
    """Counts and best results, read back from MLflow (the source of truth, also after --resume)."""
    runs = tracking.search_study_runs(mc, exp_id, plan.study)
    finished = [r for r in runs if r.info.status == layout.FINISHED]
    by_kind: dict[str, list] = {}
    for r in finished:
        by_kind.setdefault(r.data.tags.get(layout.TAG_KIND), []).append(r)
    best: dict[str, dict[str, Any]] = {}
    for r in by_kind.get(layout.TRAIN, []):
        m = tracking.final_metrics(r)
        task = r.data.tags.get(layout.TAG_TASK)
        key = (m.get("exact_match", -1), m.get("rank_accuracy", -1))
        if task not in best or key > best[task]["key"]:
            best[task] = {**m, "key": key, "seed": r.data.tags.get(layout.TAG_SEED)}
    train_names = {layout.train_run_name(t, s) for t, s in plan.trials}
    failed = sorted(train_names - {r.info.run_name for r in by_kind.get(layout.TRAIN, [])})
    return {
        "train_done": len(by_kind.get(layout.TRAIN, [])),
        "train_failed": failed,
        "eval_done": len(by_kind.get(layout.TRANSFER, [])) + len(by_kind.get(layout.BASELINE, [])),
        "best": best,
    }


def render_summary(summary: dict[str, Any], plan: Plan, experiment: str, exp_id: str, uri: str, tune_path: str,
                   analysis_note: str, transfer_failures: list[str], seconds: float) -> str:
    """The lines printed at the end of a study: counts, best results per task, where everything is."""
    lines = [
        "",
        f"study {plan.study!r} in {seconds:.0f} s:",
        f"  training   {summary['train_done']}/{len(plan.trials)} trials done, {len(summary['train_failed'])} failed"
        + (f" ({', '.join(summary['train_failed'])})" if summary["train_failed"] else ""),
        f"  transfer   {summary['eval_done']}/{plan.num_evaluations} transfer and baseline runs done"
        + (f"; failed: {'; '.join(transfer_failures)}" if transfer_failures else ""),
        "  best per task (over seeds):",
    ]
    for task in plan.tasks:
        b = summary["best"].get(task)
        if b is None:
            lines.append(f"    {task:<5} no finished trial")
        else:
            lines.append(f"    {task:<5} exact match {b.get('exact_match', float('nan')):.4f}  rank accuracy "
                         f"{b.get('rank_accuracy', float('nan')):.4f}  (seed {b['seed']}, best epoch "
                         f"{int(b.get('best_epoch', 0))})")
    lines += [
        f"  MLflow     experiment {experiment!r} (id {exp_id}) at {uri}",
        f"             {tracking.ui_command(uri)}",
        f"  Tune       {tune_path}",
        f"  analysis   {analysis_note}",
    ]
    return "\n".join(lines)


def resume_command(plan: Plan, opts: Options) -> str:
    """The command that finishes this study where it stopped."""
    parts = ["python sweeps/all.py", "--resume", f"--study {plan.study}"]
    if opts.experiment:
        parts.append(f"--experiment {opts.experiment}")
    # absolute, quoted: the command must name the same store and storage from any working directory
    if opts.tracking_uri:
        parts.append(f"--tracking-uri {shlex.quote(tracking.resolve_tracking_uri(opts.tracking_uri))}")
    if opts.storage_path:
        parts.append(f"--storage-path {shlex.quote(study_path(opts.storage_path, '--storage-path'))}")
    if opts.address:
        parts.append(f"--address {opts.address}")
    return " ".join(parts)
