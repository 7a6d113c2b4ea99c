"""A study's command line and the plan it describes: ``sweeps/all.py``'s flags (``build_parser``), ``--tasks``,
``--seeds`` and ``--targets`` read, the declaration ``--study`` names (``sweeps/studies/*.toml``) turned into plan
fields, and the plan itself (``plan_from_args``): built from the flags and the declaration, or, on ``--resume``,
the stored one, which the command line must agree with. The run options (``options_from_args``) are free to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ptray.cli import OneLineParser, add_config_arguments, config_from_args
from ptray.config import TrainConfig
from ptray.data.task_schema import task_from_declaration
from ptray.data.tasks import (
    TASK_NAMES,
    add_task_file_argument,
    get_task,
    register_declaration,
    register_task_files,
    user_declarations,
)
from ptray.errors import PtrayError
from ptray.files import check_name
from ptray.plan import PER_TRIAL_FIELDS, SMOKE_TRAIN, Options, Plan
from ptray.seeds import MAX_SEED
from ptray.study import preflight
from ptray.study.declared import StudyDeclaration
from ptray.study.paths import study_path
from ptray.study.study_file import load_study, shipped_studies

MAX_SEEDS = 1000  # seeds per study: a typo like 0-1000000 is refused, not expanded into a million trials


def parse_tasks(text: str) -> tuple[str, ...]:
    """``"cb,rte"`` -> ``("cb", "rte")``; unknown or repeated names are errors."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise PtrayError(f"--tasks needs at least one task; valid tasks: {', '.join(TASK_NAMES)}")
    tasks = tuple(get_task(n).name for n in names)
    dup = sorted({t for t in tasks if tasks.count(t) > 1})
    if dup:
        raise PtrayError(f"--tasks lists {', '.join(dup)} more than once")
    return tasks


def parse_targets(text: str) -> tuple[str, ...]:
    """``"wic,mytask"`` -> ``("wic", "mytask")``: transfer-only targets (registered tasks; "" for none)."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    return tuple(get_task(n).name for n in names)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0-3"`` -> ``(0, 1, 2, 3)``; ``"0,2,5-6"`` -> ``(0, 2, 5, 6)``. Seeds are integers >= 0, each once."""
    seeds: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise PtrayError(f"--seeds {text!r}: {part!r} is not a seed or a range like 0-3 (seeds are integers >= 0)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise PtrayError(f"--seeds {text!r}: the range {part!r} is empty")
        if hi > MAX_SEED:
            raise PtrayError(f"--seeds {text!r}: seed {hi} is out of range; seeds are integers from 0 to {MAX_SEED}")
        if len(seeds) + hi - lo + 1 > MAX_SEEDS:  # before expanding it: 0-4294967295 would not fit in memory
            raise PtrayError(f"--seeds {text!r} names {len(seeds) + hi - lo + 1} seeds, more than {MAX_SEEDS} "
                             f"trials per task; name fewer")
        seeds.extend(range(lo, hi + 1))
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise PtrayError(f"--seeds {text!r} repeats seed(s) {', '.join(map(str, dup))}")
    return tuple(seeds)


def build_parser(prog: str = "python sweeps/all.py") -> argparse.ArgumentParser:
    """``sweeps/all.py``'s flags: the plan's and the training config's fields (stored; ``--resume`` checks them),
    then the run options (free to change)."""
    p = OneLineParser(prog=prog, description="The whole study: Ray Tune over task x seed, the "
                                                               "transfer grid, MLflow, the analysis.")
    g = p.add_argument_group("the study (stored when it starts; --resume continues it)")
    # Study flags default to None, so that --resume can tell what the command line actually says.
    g.add_argument("--study", default=None, help=STUDY_HELP)
    add_config_arguments(g, Plan, unset_defaults=True)
    add_task_file_argument(g)  # registered before --tasks and --targets are read; the plan keeps the declarations
    notes = {k: f"smoke: {v}" for k, v in SMOKE_TRAIN.items()}
    notes["model"] = "with --smoke a tiny random BLOOM built on the fly"
    add_config_arguments(g, TrainConfig, exclude=PER_TRIAL_FIELDS, unset_defaults=True, default_notes=notes)
    add_config_arguments(p.add_argument_group("how to run it"), Options)
    return p


STUDY_HELP = ("a declared study: a shipped one's name (" + ", ".join(shipped_studies()) + ": sweeps/studies/) or "
              "a study file (.toml); its name is the study id (with --smoke a new NAME-smoke-<date>-<time>); flags "
              "given here win over its tasks, seeds and [train] values (a field its conditions or search set cannot "
              "be a flag). Any other name is a plain study id (default: paper; with --smoke a new "
              "smoke-<date>-<time>)")


def study_declaration(study: str | None) -> StudyDeclaration | None:
    """``--study`` as a declaration: a shipped study's name or a study file (a ``.toml`` path); None for a plain
    study id (any other name)."""
    if study is None:
        return None
    if study in shipped_studies() or study.endswith(".toml") or "/" in study or Path(study).is_file():
        return load_study(study)
    return None


def study_id(args: argparse.Namespace, decl: StudyDeclaration | None, given: str | None = None) -> str:
    """The study id: ``given`` (a script that names its studies itself: ``sweeps/spot.py``'s phases), else a
    declaration's name, else ``--study``; each smoke run a new study (``[NAME-]smoke-<time>``)."""
    if given is not None:
        return check_name(given, "--study", "it names the study's runs and its Tune folder")
    if args.smoke and args.resume and (args.study is None or decl is not None):
        raise PtrayError("--resume --smoke needs --study: each smoke run is its own study, named smoke-<date>-<time> "
                         "(NAME-smoke-<date>-<time> for a declared study NAME: give that id; the interrupted run "
                         "printed the command to resume it)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if decl is not None:
        study = f"{decl.name}-smoke-{stamp}" if args.smoke else decl.name
    else:  # each smoke run is a new study, so that `make smoke` works again and again; the paper's study is one
        study = args.study or (f"smoke-{stamp}" if args.smoke else "paper")
    return check_name(study, "--study", "it names the study's runs and its Tune folder")


def declared_plan(decl: StudyDeclaration) -> dict[str, Any]:
    """The plan fields a declaration sets (but ``train``): tasks, seeds, conditions, search, its file."""
    search = {}
    if decl.search:
        search = {"space": {k: {**dataclasses.asdict(s), "values": list(s.values)} for k, s in decl.search.items()},
                  "scheduler": decl.scheduler, "metric": decl.metric, "mode": decl.mode}
    return {"tasks": decl.tasks, "seeds": decl.seeds, "conditions": {k: dict(v) for k, v in decl.conditions.items()},
            "search": search, "num_samples": decl.num_samples if decl.search else None,
            "declaration": {"name": decl.name, "source": decl.source, "digest": decl.digest}}


def _check_declared(plan: Plan, given_train: dict[str, Any]) -> None:
    """What a declared plan cannot be: a flag on a field its conditions or search set, a searched group, a
    condition's overrides that ``TrainConfig`` refuses with the flags."""
    set_by = {k: f"its conditions ({', '.join(plan.conditions)})" for over in plan.conditions.values() for k in over}
    set_by.update({k: "its search" for k in plan.search.get("space", {})})
    for key in given_train:
        if key in set_by:
            raise PtrayError(f"--{key.replace('_', '-')}: the study sets {key} in {set_by[key]}; leave the flag out "
                             f"(or declare a study without it)")
    if plan.search and plan.group_size not in (None, 1):
        raise PtrayError(f"--group-size {plan.group_size}: a searched trial is a group of one (its scheduler stops "
                         f"trials, and a group holds several prompts); leave --group-size out")
    for name, over in plan.conditions.items():
        if any("{source}" in str(v) for v in over.values()):  # a template of sweeps/spot.py's, not a study
            raise PtrayError(f"study {plan.study!r} names each condition's source task as {{source}}: it runs in two "
                             f"phases (the sources, then every target from each): run it with python sweeps/spot.py")
        try:
            plan.trial_config((plan.tasks[0], plan.seeds[0], name))
        except PtrayError as err:
            raise PtrayError(f"condition {name!r} of study {plan.study!r}: {err}") from None


def plan_from_args(args: argparse.Namespace, stored: dict[str, Any] | None = None, study: str | None = None) -> Plan:
    """The study's plan: the stored one on --resume (the command line must agree with it), else from the flags
    and the declaration ``--study`` names (the flags win over its tasks, seeds and ``[train]``). ``study``: the
    study id, when the caller chose it (``study_id``).

    Raises ``PtrayError`` naming every flag that differs from the stored plan, or a declaration that changed.
    ``--task-file`` tasks are registered first; a stored plan's user tasks are registered from the plan (a task
    file given again must declare them as they were).
    """
    register_task_files(getattr(args, "task_files", None) or [])  # before any task name is looked up
    if stored is not None:
        register_plan_tasks(stored)
    decl = study_declaration(args.study)
    given = _given(Plan, args)
    for name, parse in PLAN_PARSERS.items():
        if name in given:
            given[name] = parse(given[name])
    given_train = _given(TrainConfig, args, exclude=PER_TRIAL_FIELDS)
    if "data_dir" in given_train:
        given_train["data_dir"] = preflight.resolve_data_dir(given_train["data_dir"])
    if "model" in given_train:  # absolute: each trial runs in its own working directory
        given_train["model"] = study_path(given_train["model"], "--model", hub_name=True)
    study = study_id(args, decl, study)
    if stored is not None:
        plan = Plan.from_json(stored)
        have = plan.compared()
        differ = [f"--{k.replace('_', '-')} (the study has {_show(have[k])}, the command line says {_show(v)})"
                  for k, v in {**given, **given_train}.items() if k in have and v != have[k]]
        if decl is not None:
            differ += _declaration_differs(plan, decl)
        if differ:
            raise PtrayError(f"--resume continues study {study!r} as it was started, but " + "; ".join(differ)
                             + "; leave those flags out, or start a new --study")
        return plan
    smoke = bool(given.get("smoke"))
    declared = declared_plan(decl) if decl is not None else {}
    train = TrainConfig(**{**(decl.train if decl else {}), **(SMOKE_TRAIN if smoke else {}), **given_train})
    plan = Plan(study=study, **{**declared, **given, "smoke": smoke}, tiny_model=smoke and "model" not in given_train,
                train=train)
    _check_declared(plan, given_train)
    plan.task_declarations = tuple(user_declarations(plan.transfer_targets))  # shipped to every worker
    return plan


def register_plan_tasks(stored: dict[str, Any]) -> None:
    """Register a stored plan's user tasks in this process (``--resume`` needs no ``--task-file``).

    Raises:
        PtrayError: a task of that name is registered (from ``--task-file``) with another declaration: the file was
            edited since the study started (their digests differ).
    """
    for decl in stored.get("task_declarations") or ():
        task = task_from_declaration(decl, "the study's plan")
        try:
            known = get_task(task.name)
        except PtrayError:
            known = None
        if known is not None and known.digest != task.digest:
            raise PtrayError(f"--resume: task {task.name!r} from {known.source} differs from the declaration the "
                             f"study started with (digest {known.digest} != {task.digest}); resume with the task file "
                             f"as it was (or without --task-file: the study keeps it), or start a new --study")
        register_declaration(decl, f"study plan ({task.name})")


def _declaration_differs(plan: Plan, decl: StudyDeclaration) -> list[str]:
    """How the declaration ``--study`` names differs from the one a stored plan was built from: its digest when the
    plan has one, else its conditions and search (a plain study of the same name has neither)."""
    if plan.declaration:
        if plan.declaration["digest"] != decl.digest:
            return [f"the declaration {decl.source} changed since the study started (digest {decl.digest[:12]}, the "
                    f"study has {plan.declaration['digest'][:12]} from {plan.declaration['source']})"]
        return []
    declared = declared_plan(decl)
    return [f"the declaration's {k} (the study has {plan.compared()[k] or 'none'}, {decl.source} says {declared[k]})"
            for k in ("conditions", "search") if declared[k] != plan.compared()[k]]


# Plan flags whose text is parsed here rather than by argparse, so that an error names the whole value
# (``--seeds '0-x': ...``); every other Plan flag reaches the Plan as argparse typed it.
PLAN_PARSERS: dict[str, Callable[[str], Any]] = {"tasks": parse_tasks, "seeds": parse_seeds,
                                                 "targets": parse_targets}


def _given(cls: type, args: argparse.Namespace, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of the dataclass ``cls`` that the command line set, by field name.

    The fields with a flag are asked of ``add_config_arguments`` (on a scratch parser) rather than listed here, so
    that a new field's flag reaches the plan without further code; ``build_parser`` defaults them to None (unset).
    """
    names = add_config_arguments(argparse.ArgumentParser(add_help=False), cls, exclude=exclude)
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else repr(value)


def options_from_args(args: argparse.Namespace) -> Options:
    """The run options from the flags (``--address`` defaults to ``$RAY_ADDRESS``)."""
    opts = config_from_args(Options, args)
    opts.address = opts.address or os.environ.get("RAY_ADDRESS") or None
    opts.analysis_dir = study_path(opts.analysis_dir, "--analysis-dir")
    if opts.analysis:
        preflight.check_analysis_dir(opts.analysis_dir)  # before hours of training, not after
    return opts
