"""What a study prints: the plan before it starts (also ``--dry-run``) and the summary at the end, read back from
MLflow (the source of truth, also after ``--resume``)."""

from __future__ import annotations

import shlex
from typing import Any

from ptray import layout
from ptray.config import DEFAULT_GPU_GROUP_SIZE, DEFAULT_GPUS_PER_TRIAL, optimizer_settings
from ptray.data.tasks import get_task
from ptray.data.tokens import answer_ids_in_context, token_ids
from ptray.errors import PtrayError
from ptray.plan import Options, Plan
from ptray.study import preflight, store, tracking
from ptray.study.paths import study_path, tune_path


def _model_subset_lr(plan: Plan) -> tuple[str, str, str]:
    """The plan's model, its example caps (", first N train / M eval examples" or "") and learning rate, as the
    study's description prints them."""
    cfg = plan.train
    model = "a tiny random BLOOM built on the fly" if plan.tiny_model else cfg.model
    subset = ""
    if cfg.max_train_examples or cfg.max_eval_examples:
        subset = f", first {cfg.max_train_examples or 'all'} train / {cfg.max_eval_examples or 'all'} eval examples"
    lr = "searched" if "lr" in plan.search.get("space", {}) else f"{optimizer_settings(cfg.optimizer, cfg.lr)['lr']:g}"
    return model, subset, lr


def describe(plan: Plan, opts: Options, uri: str, storage: str, experiment: str, new: bool,
             gpus: float | None = None) -> str:
    """The plan in a few lines: trials, resources, where results go."""
    if gpus is None:
        gpus_text = (f"{opts.gpus_per_trial:g} GPU" if opts.gpus_per_trial is not None else
                     f"{DEFAULT_GPUS_PER_TRIAL:g} GPU if the cluster has GPUs, else none")
    else:
        gpus_text = f"{gpus:g} GPU"
    model, subset, lr = _model_subset_lr(plan)
    cfg = plan.train
    names = [layout.train_run_name(*m) for m in plan.trials]
    ray_text = f"the cluster at {opts.address}" if opts.address else "embedded (started by this script)"
    return "\n".join([
        f"study {plan.study!r} ({'new' if new else 'resume'}{', smoke' if plan.smoke else ''})",
        f"  ray        {ray_text}",
        f"  model      {model}",
        f"  data       {cfg.data_dir or 'the Hugging Face Hub (aps/super_glue)'}",
        *declared_lines(plan),
        f"  training   {len(plan.trials)} trials ({', '.join(plan.tasks)} x seeds "
        f"{', '.join(map(str, plan.seeds))}{_grid_suffix(plan)}), each {opts.cpus_per_trial:g} CPU + {gpus_text}; "
        f"up to {cfg.max_epochs} epochs (patience {cfg.patience}), {cfg.optimizer} lr {lr}, batch {cfg.batch_size}, "
        f"max length {cfg.max_length}{subset}; "
        f"{opts.max_failures} retries",
        f"             {' '.join(names)}",
        f"  groups     {_groups_text(plan)}",
        f"  transfer   {'up to ' if plan.search else ''}{plan.num_evaluations} evaluations ({len(plan.trials)} "
        f"prompts x {len(plan.transfer_targets)} "
        f"tasks + {len(plan.transfer_targets)} no-prompt baselines), one Ray task per target task, same resources"
        + (f"; transfer only (not trained): {', '.join(plan.targets)}" if plan.targets else ""),
        *token_lines(plan),
        f"  MLflow     experiment {experiment!r} at {uri}",
        f"  Tune       {tune_path(storage, plan.study)} (checkpoint every epoch)",
        _analysis_line(opts, experiment),
    ])


def _analysis_line(opts: Options, experiment: str) -> str:
    """Where the analysis's report goes (``--analysis-dir``, else ``analysis.run``'s default folder)."""
    if not opts.analysis:
        return "  analysis   off"
    where = shlex.quote(opts.analysis_dir or f"outputs/analysis/{experiment}")
    return (f"  analysis   at the end, report in {where} (later: python -m analysis --experiment {experiment} "
            f"--out {where})")


def describe_local(plan: Plan, opts: Options, study_dir: str, uri: str, experiment: str, new: bool) -> str:
    """The plan of a local study (``--local DIR``: this process, no Ray, run folders in DIR) in a few lines; with
    ``new`` False (a resume) also what is left, read from DIR's run folders and checkpoints."""
    from ptray.study.local import study_progress

    model, subset, lr = _model_subset_lr(plan)
    cfg = plan.train
    groups = (f"{plan.group_size} prompts per group" if plan.group_size else
              f"one prompt at a time on a CPU, {DEFAULT_GPU_GROUP_SIZE} per group on a GPU")
    threads = f"{opts.threads} torch threads" if opts.threads else "torch's own thread count"
    lines = [
        f"study {plan.study!r} ({'new' if new else 'resume'}{', smoke' if plan.smoke else ''})",
        f"  local      this process, no Ray ({threads}{', blocks compiled' if opts.compile else ''}); run folders "
        f"in {study_dir}",
        f"  model      {model}",
        f"  data       {cfg.data_dir or 'the Hugging Face Hub (aps/super_glue)'}",
        *declared_lines(plan),
        f"  training   {len(plan.trials)} prompts ({', '.join(plan.tasks)} x seeds "
        f"{', '.join(map(str, plan.seeds))}{_grid_suffix(plan)}), {groups}; up to {cfg.max_epochs} epochs "
        f"(patience {cfg.patience}), {cfg.optimizer} lr {lr}, batch {cfg.batch_size}, max length "
        f"{cfg.max_length}{subset}; a checkpoint every epoch",
        f"             {' '.join(layout.train_run_name(*m) for m in plan.trials)}",
        f"  transfer   {plan.num_evaluations} evaluations ({len(plan.trials)} prompts x "
        f"{len(plan.transfer_targets)} tasks + {len(plan.transfer_targets)} no-prompt baselines), after training"
        + (f"; transfer only (not trained): {', '.join(plan.targets)}" if plan.targets else ""),
        *token_lines(plan),
        f"  MLflow     published at the end into experiment {experiment!r} at {uri} (or later: ptray publish "
        f"{shlex.quote(study_dir)})",
        _analysis_line(opts, experiment),
    ]
    if not new:
        p = study_progress(plan, study_dir)
        left = [n for n in p["train_planned"] if n not in p["train_done"]]
        shown = " ".join(f"{n} (after epoch {p['checkpointed'][n]})" if n in p["checkpointed"] else n
                         for n in left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
        evals = plan.num_evaluations - p["evaluations_done"]
        lines.append("  left       nothing: every prompt and evaluation is finished" if not left and not evals else
                     f"  left       {len(left)} of {len(plan.trials)} prompts to train" + (f": {shown}" if left else "")
                     + f"; {evals} of {plan.num_evaluations} evaluations; {len(p['train_done'])} prompts finished")
    return "\n".join(lines)


def token_lines(plan: Plan, tokenizer=None) -> list[str]:
    """The plan's lines on tokens, per task: each answer's ids as the model's tokenizer gives them after the answer
    cue (what exact match and rank accuracy score) and the init text's token count (the soft prompt's length under
    text init). ``tokenizer``: None reads the plan's model's tokenizer from disk (nothing is downloaded); where it
    cannot be read here, or the model is the smoke study's tiny one built later, one line says so."""
    if tokenizer is None and not plan.tiny_model:
        tokenizer = preflight.local_tokenizer(plan.train.model)
    if tokenizer is None:
        why = "built with the tiny model" if plan.tiny_model else "not on this machine"
        return [f"  tokens     the tokenizer is {why}: each trial checks its answers and lengths"]
    lines = []
    for name in plan.transfer_targets:
        task = get_task(name)
        try:
            ids = answer_ids_in_context(tokenizer, task.answer_cue, task.answers)
            answers = ", ".join(f"{a.strip()!r} {i}" for a, i in zip(task.answers, ids))
        except PtrayError as err:  # the run refuses this task in one line; the plan shows why
            answers = str(err)
        init = plan.train.init_text if plan.train.init_text is not None else task.init_text
        text = f"; init text {len(token_ids(tokenizer, init))} tokens" if name in plan.tasks else " (transfer only)"
        lines.append(f"  {'tokens' if not lines else '':<10} {name}: answers {answers}{text}")
    return lines


def describe_left(summary: dict[str, Any], plan: Plan) -> str:
    """What a ``--resume`` of the study has left to do, from ``summarize``: one line for the dry run's plan."""
    left = summary["train_failed"]  # every planned trial neither finished nor stopped by a scheduler
    evals = max(summary["eval_expected"] - summary["eval_done"], 0)
    if not left and not evals:
        return "  left       nothing: every trial and evaluation is finished; a resume writes the summary and " \
               "the analysis again"
    shown = " ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
    return (f"  left       {len(left)} of {len(plan.trials)} trials to train" + (f" ({shown})" if left else "")
            + f", {'up to ' if plan.search else ''}{evals} of {summary['eval_expected']} evaluations; "
            f"{summary['train_done']} trials finished" + (f", {len(summary['train_stopped'])} stopped by the "
                                                           f"scheduler" if summary["train_stopped"] else ""))


def _grid_suffix(plan: Plan) -> str:
    conditions = f" x {len(plan.conditions)} conditions" if plan.conditions else ""
    return conditions + (f" x {plan.num_samples or 1} samples" if plan.search else "")


def declared_lines(plan: Plan) -> list[str]:
    """A declared study's lines of the plan: its file, conditions, grid and its size, search."""
    if not (plan.declaration or plan.conditions or plan.search):
        return []
    lines = []
    if plan.declaration:
        lines.append(f"  declared   {plan.declaration['source']} (study {plan.declaration['name']!r})")
    for name, over in plan.conditions.items():
        lines.append(f"  condition  {name}: " + (", ".join(f"{k}={v}" for k, v in over.items()) or "no overrides"))
    sizes = ([f"{len(plan.conditions)} conditions"] if plan.conditions else []) + [
        f"{len(plan.tasks)} tasks", f"{len(plan.seeds)} seeds"] + (
        [f"{plan.num_samples or 1} samples"] if plan.search else [])
    lines.append(f"  grid       {' x '.join(sizes)} = {len(plan.trials)} prompts")
    if plan.search:
        space = "; ".join(f"{k} {v['distribution']}" + (f" {v['values']}" if v["distribution"] == "choice" else
                                                         f" [{v['low']:g}, {v['high']:g}]")
                          for k, v in plan.search["space"].items())
        lines.append(f"  search     {space}; {plan.search['scheduler']} on {plan.search['metric']} "
                     f"({plan.search['mode']}) per task, epoch by epoch; one prompt per trial; the best config per "
                     f"task in the summary")
    return lines


def _groups_text(plan: Plan) -> str:
    """How the prompts are packed into Tune trials (``--group-size``)."""
    def show(size: int) -> str:
        groups = plan.groups(size)
        return f"{len(groups)} trials: " + " ".join(
            "[" + " ".join(layout.train_run_name(*m) for m in g) + "]" for g in groups)

    if plan.search:
        return "one prompt per trial (a searched trial is a group of one: its scheduler stops trials)"
    if plan.group_size is None:
        return (f"auto: one prompt per trial on CPUs; with GPUs {DEFAULT_GPU_GROUP_SIZE} prompts per trial "
                f"(one GPU each), {show(DEFAULT_GPU_GROUP_SIZE)}")
    if plan.group_size == 1:
        return "one prompt per trial (--group-size N trains N together on one model)"
    return f"{plan.group_size} prompts per trial, trained together on one model, {show(plan.group_size)}"


# How "best per task" is chosen, as the summary prints it: the same choice whatever order MLflow lists runs in.
BEST_RULE = "highest exact match, then rank accuracy; ties: lowest eval loss, then lowest seed"


def best_key(metrics: dict[str, float], seed: str | None, condition: str | None = None) -> tuple:
    """The order of ``BEST_RULE`` (greater is better) for a train run's final ``metrics``, its seed tag and
    condition tag (the last tie-break: by name, so that no tie is left to the order of a search)."""
    def number(value, missing: float) -> float:
        return missing if value is None or value != value else float(value)  # NaN counts as missing

    try:
        seed_number = int(seed)
    except (TypeError, ValueError):
        seed_number = 1 << 62
    return (number(metrics.get("exact_match"), -1.0), number(metrics.get("rank_accuracy"), -1.0),
            -number(metrics.get("eval_loss"), float("inf")), -seed_number, tuple(-ord(c) for c in condition or ""))


def summarize(mc, exp_id: str, plan: Plan) -> dict[str, Any]:
    """Counts and best results, read back from MLflow (the source of truth, also after --resume)."""
    runs = tracking.search_study_runs(mc, exp_id, plan.study)
    finished = [r for r in runs if r.info.status == layout.FINISHED]
    by_kind: dict[str, list] = {}
    for r in finished:
        by_kind.setdefault(r.data.tags.get(layout.TAG_KIND), []).append(r)
    best: dict[str, dict[str, Any]] = {}
    searched: dict[str, dict[str, Any]] = {}  # a search: the best sampled config per task (the declared metric)
    metric, sign = plan.search.get("metric", "eval_loss"), -1 if plan.search.get("mode", "min") == "min" else 1
    for r in by_kind.get(layout.TRAIN, []):
        m = tracking.final_metrics(r)
        task = r.data.tags.get(layout.TAG_TASK)
        key = best_key(m, r.data.tags.get(layout.TAG_SEED), r.data.tags.get(layout.TAG_CONDITION))
        if task not in best or key > best[task]["key"]:
            best[task] = {**m, "key": key, "seed": r.data.tags.get(layout.TAG_SEED),
                          "condition": r.data.tags.get(layout.TAG_CONDITION)}
        if plan.search and metric in m and (task not in searched or sign * m[metric] > searched[task]["key"]):
            searched[task] = {"key": sign * m[metric], "value": m[metric], "run": r.info.run_name,
                              "config": {k: r.data.params.get(k) for k in plan.search["space"]}}
    stopped = sorted(r.info.run_name for r in runs if r.data.tags.get(layout.TAG_KIND) == layout.TRAIN
                     and r.info.status == layout.KILLED and r.data.tags.get(layout.TAG_STOPPED_BY))
    train_names = {layout.train_run_name(*m) for m in plan.trials}
    failed = sorted(train_names - {r.info.run_name for r in by_kind.get(layout.TRAIN, [])} - set(stopped))
    train_done = len(by_kind.get(layout.TRAIN, []))
    eval_done = len(by_kind.get(layout.TRANSFER, [])) + len(by_kind.get(layout.BASELINE, []))
    targets = len(getattr(plan, "transfer_targets", plan.tasks))
    # a search evaluates the prompts its scheduler let finish
    eval_expected = train_done * targets + targets if plan.search else plan.num_evaluations
    return {
        "train_done": train_done,
        "train_failed": failed,
        "train_stopped": stopped,
        "eval_done": eval_done,
        "eval_expected": eval_expected,
        "best": best,
        "searched": searched,
        "complete": train_done + len(stopped) == len(plan.trials) and eval_done == eval_expected,
    }


def render_summary(summary: dict[str, Any], plan: Plan, experiment: str, exp_id: str, uri: str, tune_path: str,
                   analysis_note: str, transfer_failures: list[str], seconds: float,
                   artifacts: str | None = None) -> str:
    """The lines printed at the end of a study: counts, best results per task, where everything is (``artifacts``:
    where the experiment's runs keep their files, ``tracking.artifact_location``)."""
    lines = [
        "",
        f"study {plan.study!r} in {seconds:.0f} s:",
        f"  training   {summary['train_done']}/{len(plan.trials)} trials done, "
        + (f"{len(summary['train_stopped'])} stopped early by {plan.search['scheduler']}, " if plan.search else "")
        + f"{len(summary['train_failed'])} failed"
        + (f" ({', '.join(summary['train_failed'])})" if summary["train_failed"] else ""),
        f"  transfer   {summary['eval_done']}/{summary['eval_expected']} transfer and baseline runs done"
        + (f"; failed: {'; '.join(transfer_failures)}" if transfer_failures else ""),
        f"  best per task (over seeds; {BEST_RULE}):",
    ]
    for task in plan.tasks:
        b = summary["best"].get(task)
        if b is None:
            lines.append(f"    {task:<5} no finished trial")
        else:
            condition = f", condition {b['condition']}" if b.get("condition") else ""
            lines.append(f"    {task:<5} exact match {b.get('exact_match', float('nan')):.4f}  rank accuracy "
                         f"{b.get('rank_accuracy', float('nan')):.4f}  (seed {b['seed']}{condition}, best epoch "
                         f"{int(b.get('best_epoch', 0))})")
    if plan.search:
        lines.append(f"  best config per task ({plan.search['metric']}, {plan.search['mode']}):")
        for task in plan.tasks:
            s = summary["searched"].get(task)
            lines.append(f"    {task:<5} " + ("no finished trial" if s is None else
                                              " ".join(f"{k} {v}" for k, v in s["config"].items())
                                              + f"  ({plan.search['metric']} {s['value']:.4f}, {s['run']})"))
    lines += [
        f"  MLflow     experiment {experiment!r} (id {exp_id}) at {uri}",
        *([f"             artifacts in {artifacts}"] if artifacts else []),
        f"             {store.ui_command(uri)}",
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
        parts.append(f"--tracking-uri {shlex.quote(store.resolve_tracking_uri(opts.tracking_uri))}")
    if opts.storage_path:
        parts.append(f"--storage-path {shlex.quote(study_path(opts.storage_path, '--storage-path'))}")
    if opts.address:
        parts.append(f"--address {opts.address}")
    return " ".join(parts)
