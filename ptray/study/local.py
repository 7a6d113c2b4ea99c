"""A local study: the whole plan in one process on one device (one GPU, or a machine where Ray cannot run).

The same plan as the Ray study (tasks x seeds, one ``TrainConfig``), the same training loop (``train_group``, the
prompts in groups on one frozen model) and the same transfer grid (every trained prompt and no prompt on every
task, many prompts per pass with ``evaluate_prompts``), but no Ray and no MLflow: the study is a folder of **run
folders**, one per training run and per evaluation, each holding exactly what the Ray study logs to MLflow for that
run. ``ptray.study.publish`` logs them into MLflow later (or at once, when MLflow is installed and reachable), with
the same functions the Ray study logs through, so the two cannot drift.

A study folder::

    plan.json                    the plan (``Plan.to_json``) and the study's id
    runs/<run name>/run.json     kind, tags, status and params of the run (``layout`` names, as in MLflow)
    runs/<run name>/...          a train run: ``save_run``'s files (prompt/, metrics.json, history.json,
                                 predictions.json, config.json); an evaluation: metrics.json, predictions.json
    checkpoints/<run name>/      a prompt still training: its last epoch's state (``checkpoints.save_checkpoint``)
    .ptray-lock                  held while a process runs the study (``folder_lock``): a second one is refused

It resumes: a stopped study continues each unfinished prompt after its last checkpointed epoch, and skips every
run whose folder is complete (a run folder appears whole or not at all). Nothing is done twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ptray import layout
from ptray.config import DEFAULT_GPU_GROUP_SIZE
from ptray.errors import PtrayError
from ptray.files import atomic_folder, check_output_folder, write_json
from ptray.plan import Plan

log = logging.getLogger("ptray")

PLAN_FILE = "plan.json"
RUNS = "runs"
CHECKPOINTS = "checkpoints"
RUN_FILE = "run.json"
LOCK_FILE = ".ptray-lock"  # held while a process runs the study (``folder_lock``); never committed or published
FORMAT = 1  # the study folder's layout version


def run_dir(study_dir: str | Path, name: str) -> Path:
    """The folder of run ``name`` in a local study."""
    return Path(study_dir) / RUNS / name


def finished_runs(study_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``run.json`` of every complete run folder of a local study, by run name."""
    out = {}
    for path in sorted((Path(study_dir) / RUNS).glob(f"*/{RUN_FILE}")):
        info = json.loads(path.read_text())
        if info.get("status") == layout.FINISHED:
            out[path.parent.name] = info
    return out


def study_progress(plan: Plan, study_dir: str | Path) -> dict[str, Any]:
    """What a local study folder holds of ``plan``: ``train_planned`` (its train run names, in plan order),
    ``train_done`` (those finished), ``checkpointed`` (unfinished prompt -> its last checkpointed epoch) and
    ``evaluations_done`` (finished transfer and baseline runs)."""
    done = finished_runs(study_dir)
    planned = [layout.train_run_name(*m) for m in plan.trials]
    checkpointed = {}
    for name in planned:
        info = Path(study_dir) / CHECKPOINTS / name / RUN_FILE
        if name not in done and info.is_file():
            try:
                checkpointed[name] = int(json.loads(info.read_text()).get("epoch", 0))
            except (OSError, ValueError, TypeError, AttributeError):  # unreadable: resume finds out; not said here
                pass
    return {"train_planned": planned, "train_done": [n for n in planned if n in done],
            "checkpointed": checkpointed,
            "evaluations_done": sum(1 for i in done.values() if i.get("kind") in layout.EVAL_KINDS)}


def read_plan(study_dir: str | Path) -> Plan:
    """The plan of a local study folder. Raises PtrayError (one line) for a folder that is not one."""
    path = Path(study_dir) / PLAN_FILE
    if not path.is_file():
        raise PtrayError(f"{str(study_dir)!r} is not a local study folder (no {PLAN_FILE}); pass the folder "
                         f"`ptray study --local DIR` wrote")
    try:
        return Plan.from_json(json.loads(path.read_text())["plan"])
    except (ValueError, KeyError, TypeError) as err:
        raise PtrayError(f"{str(path)!r} is not a plan ptray can read ({type(err).__name__}: {err})") from None


def check_new_folder(study_dir: str | Path) -> Path:
    """Refuse, creating nothing, a new local study's folder that cannot be written or already holds files (a
    study started there: resume it); the run and its dry run say the same line. Returns it as a Path.

    Raises:
        PtrayError: one line naming the folder and what to do.
    """
    return check_output_folder(Path(study_dir), "--local", holds="files", fix="or resume it with --resume")


_HELD: set[str] = set()  # study folders this process holds (``folder_lock`` is re-entrant within a process)


@contextmanager
def folder_lock(study_dir: str | Path):
    """Hold the study folder for this process (an exclusive ``flock`` on its ``LOCK_FILE``, which names the holder),
    so that a second process on the same folder (a resume started while the study still runs, trains, publishes or
    is analysed in the background; a ``ptray publish`` meanwhile) is refused instead of training the same prompts
    into the same checkpoints or publishing the same runs twice. Re-entrant within a process (the study holds it
    across training, publishing and the analysis; ``run_local`` and ``publish`` take it too). The kernel drops the
    lock when the process ends, however it ends (kill -9 included): a stale lock never blocks a resume.

    Raises:
        PtrayError: another process holds the folder (one line naming its pid and host), or the lock file cannot
            be written there.
    """
    import fcntl
    import os
    import socket

    key = str(Path(study_dir).resolve())
    if key in _HELD:
        yield
        return
    path = Path(key) / LOCK_FILE
    try:
        handle = open(path, "a+")
    except OSError as err:
        raise PtrayError(f"cannot write the lock file {str(path)!r} of the local study ({err.strerror or err}); "
                         f"the study folder must be writable") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise PtrayError(f"the local study in {key!r} is in use ({holder}): it is running, publishing or being "
                         f"analysed; wait for it to finish or stop it, then resume with --resume") from None
    _HELD.add(key)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield
    finally:
        _HELD.discard(key)
        handle.close()  # closing the file drops the lock


def prepare(plan: Plan, study_dir: str | Path, resume: bool) -> Path:
    """Create the study folder with its plan, or check a stopped one against ``plan`` (``resume``).

    Raises PtrayError: a new study's folder holds files; a resumed one is not a study or has another plan.
    """
    out = Path(study_dir)
    if resume:
        stored = read_plan(out)
        if stored.compared() != plan.compared() or stored.study != plan.study:
            changed = sorted(k for k, v in plan.compared().items() if stored.compared().get(k) != v)
            raise PtrayError(f"the local study in {str(out)!r} was started with another plan (differs in: "
                             f"{', '.join(changed) or 'study'}); resume with the same flags or start a new folder")
        return out
    check_new_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / PLAN_FILE, {"format": FORMAT, "study": plan.study, "plan": plan.to_json()})
    return out


def _write_run(study_dir: Path, name: str, info: dict[str, Any], files: dict[str, Any] | None = None,
               folder: Path | None = None) -> None:
    """Write run ``name`` whole: ``folder``'s files (a ``save_run`` folder) or JSON ``files``, then ``run.json``."""
    target = run_dir(study_dir, name)
    with atomic_folder(target) as tmp:
        if folder is not None:
            for path in folder.iterdir():
                path.rename(tmp / path.name)
        for file, obj in (files or {}).items():
            write_json(tmp / file, obj)
        write_json(tmp / RUN_FILE, {**info, "status": layout.FINISHED})


def run_local(plan: Plan, study_dir: str | Path, resume: bool = False, device: str | None = None,
              progress: bool | None = None, threads: int | None = None, compile: bool = False) -> dict[str, int]:
    """Run ``plan`` in this process into the study folder ``study_dir``; return counts of the runs written.

    ``device``: the plan's train device when None (auto: the GPU if there is one). ``progress``: one overall bar
    (prompts x epochs, with an ETA) on stderr; None shows it only when stderr is a terminal. Each finished epoch is
    also one log line. ``threads``: torch's CPU threads meanwhile (None: as they are; ``ptray study --local`` passes
    ``--threads``). ``compile``: ``--compile``, a run option (not in the plan, free on ``--resume``): each block
    of the frozen model compiled, for training and evaluation. Raises PtrayError for anything the user must change,
    before any work where possible.
    """
    from ptray.study.context import torch_threads

    with torch_threads(threads):
        return _run_local(plan, study_dir, resume, device, progress, compile)


def _run_local(plan: Plan, study_dir: str | Path, resume: bool, device: str | None,
               progress: bool | None, compile: bool = False) -> dict[str, int]:
    if plan.search:  # before anything is written
        raise PtrayError("a search needs Ray Tune's scheduler: run this study without --local")
    out = prepare(plan, study_dir, resume)
    with folder_lock(out):
        return _run_prepared(plan, out, device, progress, compile)


def _run_prepared(plan: Plan, out: Path, device: str | None, progress: bool | None,
                  compile: bool) -> dict[str, int]:
    from ptray.lm.load import resolve_device_precision

    train = plan.train if device is None else dataclasses.replace(plan.train, device=device)
    if compile:
        train = dataclasses.replace(train, compile=True)
    if plan.tiny_model:  # the smoke model, built once into the study folder (so a resume uses the same weights)
        from ptray.lm.tiny_model import build

        model_dir = out / "tiny-model"
        if not (model_dir / "config.json").is_file():
            build(model_dir)
        train = dataclasses.replace(train, model=str(model_dir.resolve()))
    resolved_device, _ = resolve_device_precision(train.device, train.precision)
    size = plan.group_size or (DEFAULT_GPU_GROUP_SIZE if resolved_device == "cuda" else 1)
    t0 = time.perf_counter()
    trained = _train(plan, train, out, size, progress)
    evaluated = _transfer(plan, train, out)
    log.debug("local study %s: %d train runs and %d evaluations in %.1f s", plan.study, trained, evaluated,
              time.perf_counter() - t0)
    return {"train": trained, "evaluations": evaluated}


def _bar(total: int, progress: bool | None):
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, unit="epoch", desc="prompts x epochs", disable=not show, dynamic_ncols=True)


def _member_config(plan: Plan, train, member: tuple, out: Path):
    """A trial's ``TrainConfig`` in the local study: the plan's (its condition's overrides, task, seed) on this
    study's model and device; a SPoT source named by its run (``init_source = "rte-seed0"``) is that run's folder."""
    cfg = dataclasses.replace(plan.trial_config(member), model=train.model, device=train.device,
                              compile=train.compile)
    source = cfg.init_source
    if source is not None and not Path(source).expanduser().exists():
        folder = run_dir(out, source.replace("{seed}", str(member[1])))
        if not (folder / layout.PROMPT_DIR).is_dir():
            raise PtrayError(f"init source {source!r} of {layout.train_run_name(*member)} is neither a folder nor a "
                             f"finished run of this local study; train the source first, or give its run folder")
        cfg = dataclasses.replace(cfg, init_source=str(folder))
    return cfg


def _train(plan: Plan, train, out: Path, size: int, progress: bool | None) -> int:
    """Train every prompt of the plan not finished yet, in the plan's groups of ``size``; return how many finished."""
    from ptray.study.checkpoints import load_checkpoint, save_checkpoint
    from ptray.training.loop import train_group
    from ptray.training.run_folder import save_run

    done = finished_runs(out)
    todo = {m for m in plan.trials if layout.train_run_name(*m) not in done}
    groups = [[m for m in group if m in todo] for group in plan.groups(size)]
    groups = [g for g in groups if g]
    states = {}
    for member in todo:
        ckpt = out / CHECKPOINTS / layout.train_run_name(*member)
        if (ckpt / "state.pt").is_file():
            states[member] = {k: v for k, v in load_checkpoint(ckpt).items() if k != "run_id"}
    cfgs_of = {m: _member_config(plan, train, m, out) for m in todo}
    epochs_left = sum(cfgs_of[m].max_epochs - (states[m]["epoch"] if m in states else 0) for m in todo)
    bar = _bar(epochs_left, progress)
    written = 0
    try:
        for members in groups:
            cfgs = [cfgs_of[m] for m in members]
            names = [layout.train_run_name(*m) for m in members]

            def on_epoch_end(i: int, metrics: dict[str, Any], state: dict[str, Any], names=names) -> None:
                with atomic_folder(out / CHECKPOINTS / names[i]) as tmp:
                    save_checkpoint(tmp, state, "")
                bar.update(1)

            def on_prompt_end(i: int, result, names=names, members=members, cfgs=cfgs) -> None:
                nonlocal written
                member, cfg = members[i], cfgs[i]
                for key in ("group_size", "group_index"):  # a run's config as a single trial logs it
                    result.resolved.pop(key, None)
                config = logged_config(plan, result.resolved)
                condition = _condition(member)
                tags = layout.run_tags(plan.study, layout.TRAIN, member[0], member[1], condition=condition)
                if cfg.init_source is not None:  # SPoT: the run it started from, by name where it is one of ours
                    tags[layout.TAG_INIT_FROM] = Path(cfg.init_source).name \
                        if Path(cfg.init_source).parent == out / RUNS else cfg.init_source
                with tempfile.TemporaryDirectory(prefix="ptray-run-", dir=out) as tmp:
                    folder = save_run(result, Path(tmp) / "run")
                    write_json(folder / layout.CONFIG_FILE, config)
                    _write_run(out, names[i], {"name": names[i], "kind": layout.TRAIN, "params": config,
                                               "tags": tags}, folder=folder)
                shutil.rmtree(out / CHECKPOINTS / names[i], ignore_errors=True)
                bar.update(max(0, cfg.max_epochs - result.metrics["epochs_run"]))  # epochs early stopping saved
                written += 1

            train_group(cfgs, on_epoch_end=on_epoch_end, resume=[states.get(m) for m in members],
                        on_prompt_end=on_prompt_end)
    finally:
        bar.close()
    return written


def logged_config(plan: Plan, resolved: dict[str, Any]) -> dict[str, Any]:
    """A run's resolved config as the Ray study logs it (``StudyContext.logged_config``): the model and data as the
    user named them, and the study's id."""
    out = dict(resolved)
    out["model"] = plan.train.model if not plan.tiny_model else resolved["model"]
    out["data_dir"] = plan.train.data_dir
    return {"study": plan.study, **out}


def _transfer(plan: Plan, train, out: Path) -> int:
    """Every trained prompt and no prompt on every task's validation split, runs already written skipped."""
    import torch

    from ptray.config import EvalConfig, resolve_attention
    from ptray.data.batching import encode_all
    from ptray.data.superglue import load_split
    from ptray.data.tasks import get_task
    from ptray.data.tokens import pad_token_id
    from ptray.lm.attention import attention_implementation
    from ptray.lm.evaluate import evaluate_prompts
    from ptray.lm.load import resolve_device_precision, setup_model
    from ptray.lm.prompt import load_adapter
    from ptray.versions import code_version, compute_settings, library_versions

    done = finished_runs(out)
    sources = [m for m in plan.trials if layout.train_run_name(*m) in done]
    cfg = EvalConfig.from_train(train)
    device, precision = resolve_device_precision(cfg.device, cfg.precision)
    attention = resolve_attention(cfg.attention, device)
    model = None
    written = 0
    for target in plan.transfer_targets:  # the trained tasks, then the transfer-only targets
        baseline = layout.baseline_run_name(target)
        todo = [m for m in sources if layout.transfer_run_name(*m[:2], target, _condition(m)) not in done]
        if baseline in done and not todo:
            continue
        if model is None:
            model, tokenizer, accelerator = setup_model(cfg.model, device, precision, cfg.compile, attention)
        task = get_task(target)
        data = encode_all(task, load_split(task, cfg.split, cfg.data_dir, cfg.hub_dataset, cfg.max_examples),
                          tokenizer, cfg.max_length)
        idx = [d.idx for d in data if d.label is not None]
        prompts = [load_adapter(run_dir(out, layout.train_run_name(*m)) / layout.PROMPT_DIR) for m in todo]
        with torch.no_grad():
            results = evaluate_prompts(model, data, [None] + prompts, cfg.batch_size, pad_token_id(tokenizer),
                                       tokenizer.eos_token_id, autocast=accelerator.autocast)
        base = results.pop(0)
        no_prompt = {"exact_match": base.exact_match, "rank_accuracy": base.rank_accuracy}
        if baseline in done:  # the deltas against the stored baseline, as the Ray study's transfer reads it
            stored = json.loads((run_dir(out, baseline) / layout.METRICS_FILE).read_text())
            no_prompt = {k: stored[k] for k in no_prompt}
        params = {"study": plan.study, "model": plan.train.model if not plan.tiny_model else cfg.model,
                  "data_dir": plan.train.data_dir, "target": target, "template_version": task.version,
                  "eval_split": cfg.split, "max_eval_examples": cfg.max_examples, "max_length": cfg.max_length,
                  "device": device, "precision": precision, "attention": attention,
                  "attention_implementation": attention_implementation(model), "code_version": code_version(),
                  **library_versions(), **compute_settings()}
        if baseline not in done:
            _write_eval(out, plan, None, None, target, base, idx, no_prompt, {**params, "source": layout.NO_SOURCE})
            written += 1
        for member, prompt, res in zip(todo, prompts, results):
            source, seed, condition = member[0], member[1], _condition(member)
            extra = {"source_condition": condition} if condition else {}
            _write_eval(out, plan, source, seed, target, res, idx, no_prompt,
                        {**params, "source": source, "source_seed": seed, **extra,
                         "num_tokens": int(prompt.shape[0])}, condition)
            written += 1
    return written


def _condition(member: tuple) -> str | None:
    """The condition tag of a trial (its third element), None in a study without conditions."""
    return member[2] if len(member) > 2 else None


def _write_eval(out: Path, plan: Plan, source: str | None, seed: int | None, target: str, res, idx: list[int],
                no_prompt: dict[str, float], params: dict[str, Any], condition: str | None = None) -> None:
    """One evaluation's run folder: ``metrics.json``, ``predictions.json`` and its ``run.json`` (as the Ray study's
    ``transfer.log_evaluation`` logs it)."""
    kind, name, tags = layout.eval_run(plan.study, source, seed, target, condition)
    metrics = layout.eval_metrics(source, seed, target, res, no_prompt)
    _write_run(out, name, {"name": name, "kind": kind, "tags": tags, "params": params},
               files={layout.METRICS_FILE: metrics, layout.PREDICTIONS_FILE: layout.predictions(idx, res)})
