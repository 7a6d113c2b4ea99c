"""The task registry: every task is a declaration (a TOML task file), the built-in ones shipped with ptray.

A task knows its fields, how one example becomes model text (a template, filled by a pure ``format``), the answer
words for each label (its verbalizer) and the paper's init text (schema: ``ptray.data.task_schema``). Each
declaration carries a ``version`` that every run logs, so results from different templates are never mixed.

Built in (``ptray/data/task_files/``): the paper's four, ``TASK_NAMES`` (the default study), and WiC. A user's task
file joins the registry of the running process with ``register_task_files``; a process that did not read the
file (a Ray worker) registers the same task from ``task_declaration(name)``, a plain dict that travels with the
config, with ``register_declaration``.

Verbalizers (template version 1). The model must produce exactly these words (after the ``Answer:`` cue, with a
leading space) and then EOS:

========  =========================================================
task      label -> answer words
========  =========================================================
cb        entailment -> "yes", contradiction -> "no", neutral -> "maybe"
rte       entailment -> "yes", not_entailment -> "no"
copa      choice1 -> "1", choice2 -> "2"
wsc       True -> "yes", False -> "no"
wic       True -> "yes", False -> "no"   (not in the paper's study)
========  =========================================================

Short answer words keep exact match about the decision, not about spelling a long label; sharing "yes"/"no"
between tasks makes zero-shot transfer between them meaningful.
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Iterable, Mapping
from importlib import resources
from types import MappingProxyType
from typing import Any

from ptray.data.task import ANSWER_CUE, FORMATTERS, SPLITS, Task, register_formatter
from ptray.data.task_schema import parse_task_toml, read_task_file, task_from_declaration
from ptray.errors import PtrayError

__all__ = [
    "ANSWER_CUE", "BUILTIN_TASK_NAMES", "FORMATTERS", "SPLITS", "TASKS", "TASK_NAMES", "Task", "all_task_names",
    "add_task_file_argument", "get_task", "load_task_file", "register_declaration", "register_declarations",
    "register_formatter", "register_task_files", "task_declaration", "user_declarations",
]

TASK_NAMES: tuple[str, ...] = ("cb", "rte", "copa", "wsc")  # the paper's tasks: the default study
_BUILTIN_FILES = (*TASK_NAMES, "wic")


def _build_registry(tasks: tuple[Task, ...]) -> dict[str, Task]:
    registry: dict[str, Task] = {}
    for task in tasks:
        if task.name in registry:
            raise ValueError(f"duplicate task name {task.name!r}")
        registry[task.name] = task
    return registry


def _builtin(stem: str) -> Task:
    path = resources.files("ptray.data") / "task_files" / f"{stem}.toml"
    source = f"ptray/data/task_files/{stem}.toml"
    task = task_from_declaration(parse_task_toml(path.read_text(encoding="utf-8"), source), source)
    if task.name != stem:  # pragma: no cover - a packaging mistake
        raise ValueError(f"{source} declares task {task.name!r}; a built-in file is named after its task")
    return task


_BUILTINS: Mapping[str, Task] = MappingProxyType(_build_registry(tuple(_builtin(s) for s in _BUILTIN_FILES)))
BUILTIN_TASK_NAMES: tuple[str, ...] = tuple(_BUILTINS)  # the paper's four, then WiC
TASKS: Mapping[str, Task] = MappingProxyType({name: _BUILTINS[name] for name in TASK_NAMES})  # the paper's four
_USER: dict[str, Task] = {}  # tasks registered in this process from task files or declarations


def all_task_names() -> tuple[str, ...]:
    """Every task ``get_task`` knows in this process: the built-in ones, then the registered user tasks."""
    return BUILTIN_TASK_NAMES + tuple(_USER)


def get_task(name: str) -> Task:
    """Look a task up by name (case-insensitive): a built-in task or one registered in this process.

    Raises:
        PtrayError: unknown name; the message lists the paper's tasks, suggests the nearest registered name and
            lists the other registered tasks.
    """
    key = str(name).strip().lower()
    if key in _BUILTINS:
        return _BUILTINS[key]
    if key in _USER:
        return _USER[key]
    names = all_task_names()
    hint = difflib.get_close_matches(key, names, n=1)
    suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
    others = [n for n in names if n not in TASK_NAMES]
    more = f" Other registered tasks: {', '.join(others)}." if others else ""
    raise PtrayError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}.{suggestion}{more}")


def load_task_file(path: str | os.PathLike) -> Task:
    """Read and validate a task file (TOML, schema in ``ptray.data.task_schema``); it is not registered.

    Raises:
        PtrayError: the file is missing or not TOML, or one field is wrong (the message names the file and field).
    """
    return task_from_declaration(read_task_file(path), str(path))


def register_declaration(declaration: Mapping[str, Any], source: str = "<declaration>") -> Task:
    """Add a declared task to this process's registry (what a worker does with ``task_declaration``'s dict).

    Registering the same declaration again is a no-op (a built-in task's own declaration too), so every process may
    register what it is handed.

    Args:
        declaration: a task file's content as a dict (``task_declaration(name)``, or a parsed TOML file).
        source: where it comes from, for messages (a file path).

    Returns:
        The registered Task.

    Raises:
        PtrayError: the declaration is invalid; its name is a built-in task's; or another declaration of that
            name is already registered.
    """
    task = task_from_declaration(declaration, source)
    builtin = _BUILTINS.get(task.name)
    if builtin is not None:
        if builtin.declaration == task.declaration:  # a built-in's own declaration (shipped to a worker): known
            return builtin
        raise PtrayError(f"{source}: task name {task.name!r} is a built-in task's; choose another name")
    known = _USER.get(task.name)
    if known is not None:
        if known.declaration == task.declaration:
            return known
        raise PtrayError(f"{source}: task {task.name!r} is already registered from {known.source}, declared "
                         f"differently; give one of them another name")
    _USER[task.name] = task
    return task


def register_task_files(paths: Iterable[str | os.PathLike]) -> tuple[Task, ...]:
    """Read, validate and register task files for the running process (e.g. the paths of ``--task-file``).

    Args:
        paths: task file paths.

    Returns:
        The registered Tasks, in order.

    Raises:
        PtrayError: as ``load_task_file`` and ``register_declaration`` (a clash with a built-in name, or two files
            declaring one name differently).
    """
    return tuple(register_declaration(read_task_file(p), str(p)) for p in paths)


def register_declarations(declarations: Iterable[Mapping[str, Any]], source: str = "<declaration>") -> tuple[Task, ...]:
    """``register_declaration`` for each (what a worker runs on the list ``user_declarations`` gave the driver).

    Raises:
        PtrayError: as ``register_declaration``.
    """
    return tuple(register_declaration(d, source) for d in declarations)


TASK_FILE_HELP = ("a task declared in a TOML task file (schema: ptray.data.task_schema); repeat for more; its name "
                  "can then be given as a task")


def add_task_file_argument(parser) -> None:
    """Add ``--task-file PATH`` (repeatable; ``args.task_files``, a list, empty by default) to an argparse parser or
    group. After parsing, and before any task name is looked up, the CLI calls
    ``register_task_files(args.task_files)``."""
    parser.add_argument("--task-file", dest="task_files", action="append", default=[], metavar="PATH",
                        help=TASK_FILE_HELP)


def task_declaration(name: str) -> dict[str, Any]:
    """The declaration of a registered task as a plain, JSON-serialisable dict (a deep copy): what another process
    passes to ``register_declaration`` to know the same task.

    Raises:
        PtrayError: unknown task (as ``get_task``).
    """
    return copy.deepcopy(dict(get_task(name).declaration))


def user_declarations(names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Declarations of the registered non-built-in tasks among ``names`` (default: all of them), in registry order:
    what must travel with a config to worker processes (built-in tasks need nothing).

    Raises:
        PtrayError: a name is not a registered task.
    """
    wanted = None if names is None else {get_task(n).name for n in names}
    return [copy.deepcopy(dict(t.declaration)) for n, t in _USER.items() if wanted is None or n in wanted]


def format_cb(ex: Mapping) -> str:
    r"""CB / RTE source text (the built-in CB declaration's ``format``).

    >>> format_cb({"premise": "It rained.", "hypothesis": "the ground is wet"})
    'Premise: It rained.\nHypothesis: the ground is wet\nAnswer:'
    """
    return _BUILTINS["cb"].format(ex)


def format_copa(ex: Mapping) -> str:
    r"""COPA source text (the built-in COPA declaration's ``format``).

    >>> format_copa({"premise": "My eyes became red.", "question": "cause",
    ...              "choice1": "I was sobbing.", "choice2": "I was laughing."})
    'Premise: My eyes became red.\nWhat was the cause?\n1: I was sobbing.\n2: I was laughing.\nAnswer:'
    """
    return _BUILTINS["copa"].format(ex)


def format_wsc(ex: Mapping) -> str:
    r"""WSC source text (the built-in WSC declaration's ``format``).

    >>> format_wsc({"text": "Jane gave Joan candy because she was hungry.", "span1_text": "Jane",
    ...             "span2_text": "she", "span1_index": 0, "span2_index": 5})
    'Text: Jane gave Joan candy because she was hungry.\nDoes the pronoun "she" refer to "Jane"?\nAnswer:'
    """
    return _BUILTINS["wsc"].format(ex)


def format_wic(ex: Mapping) -> str:
    r"""WiC source text (the built-in WiC declaration's ``format``).

    >>> format_wic({"word": "class", "sentence1": "An emerging professional class.",
    ...             "sentence2": "It showed real class."})
    'Sentence 1: An emerging professional class.\nSentence 2: It showed real class.\nIs the word "class" used with the same meaning in both sentences?\nAnswer:'
    """  # noqa: E501
    return _BUILTINS["wic"].format(ex)
