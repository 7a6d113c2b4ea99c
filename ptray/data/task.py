"""A task, as its declaration states it: the ``Task`` record, its template and the registered formatters.

The declaration (a TOML task file) and its checks are ``ptray.data.task_schema``; the registry of known tasks is
``ptray.data.tasks``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ptray.errors import PtrayError

ANSWER_CUE = "Answer:"
SPLITS = ("train", "val", "test")
HUB_SPLITS = {"train": "train", "val": "validation", "test": "test"}
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")  # a placeholder's or a field's name
_TEMPLATE_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


def clean(text: Any) -> str:
    r"""Collapse all whitespace runs (including the newline inside some WSC spans) to one space; strip the ends.

    >>> clean("  Jane\nGave  Joan ")
    'Jane Gave Joan'
    """
    return " ".join(str(text).split())


# --- formatters ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Formatter:
    """A named Python function for what a template cannot express: ``fn(fields) -> {placeholder: value}``.

    ``reads`` are the record fields it looks at (a task naming it must declare them); ``provides`` the placeholders
    it fills (its template may name them; they must not be declared fields). Values are cleaned like fields.
    """

    name: str
    fn: Callable[[Mapping[str, Any]], Mapping[str, Any]]
    reads: tuple[str, ...]
    provides: tuple[str, ...]


FORMATTERS: dict[str, Formatter] = {}


def register_formatter(name: str, reads: tuple[str, ...], provides: tuple[str, ...]) -> Callable:
    """Decorator: register ``fn(fields) -> {placeholder: value}`` under ``name`` for task files' ``formatter``.

    A worker process resolves the name at format time, so the function must be registered (imported) there too;
    ptray's own are registered when ``ptray.data`` is imported.

    Raises:
        ValueError: ``name`` is already registered.
    """
    def decorator(fn: Callable) -> Callable:
        if name in FORMATTERS:
            raise ValueError(f"formatter {name!r} is already registered")
        FORMATTERS[name] = Formatter(name, fn, tuple(reads), tuple(provides))
        return fn

    return decorator


_COPA_QUESTIONS = {"cause": "What was the cause?", "effect": "What happened as a result?"}


@register_formatter("copa", reads=("question",), provides=("question_text",))
def copa_question(fields: Mapping[str, Any]) -> dict[str, str]:
    """COPA's question sentence from its ``question`` field (cause or effect).

    >>> copa_question({"question": "effect"})
    {'question_text': 'What happened as a result?'}

    Raises:
        PtrayError: ``question`` is neither "cause" nor "effect".
    """
    question = fields["question"]
    if question not in _COPA_QUESTIONS:
        raise PtrayError(f"copa formatter: field 'question' must be 'cause' or 'effect', got {question!r}")
    return {"question_text": _COPA_QUESTIONS[question]}


# --- templates ----------------------------------------------------------------------------------------------------


def parse_template(template: str) -> tuple[tuple[str, str | None], ...]:
    r"""Split a template into ``(literal text, placeholder name or None)`` pieces.

    >>> parse_template("A: {a}\n{{b}}")
    (('A: ', 'a'), ('\n{b}', None))

    Raises:
        ValueError: a brace that opens no placeholder, or a placeholder that is not a field name.
    """
    pieces: list[tuple[str, str | None]] = []
    literal, pos = [], 0
    for match in _TEMPLATE_TOKEN.finditer(template):
        literal.append(template[pos:match.start()])
        pos = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            literal.append(token[0])
        elif token in ("{", "}"):
            raise ValueError(f"unmatched {token!r} at character {match.start()} (write {token * 2} for a literal "
                             f"brace)")
        else:
            name = match.group(1)
            if not IDENTIFIER.match(name):
                raise ValueError(f"placeholder {token} is not a field name")
            pieces.append(("".join(literal), name))
            literal = []
    literal.append(template[pos:])
    if "".join(literal) or not pieces:
        pieces.append(("".join(literal), None))
    return tuple(pieces)


# --- the task -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One task, as its declaration states it (build it with ``task_from_declaration``).

    ``labels`` are the canonical label names (the official jsonl values as strings); records carry the label as
    an index into it. ``text_fields`` are the fields truncation may shorten; ``int_fields`` the integer ones; the
    rest of ``fields`` are strings. ``allowed_values`` lists the only values a field may take (COPA's question),
    checked when a record is read. ``declaration`` is the file's content as a plain dict (JSON-serialisable), from
    which any process can rebuild the task; ``source`` says where it was declared.
    """

    name: str
    dir_name: str  # folder name in the official layout: <data_dir>/<dir_name>/<split>.jsonl
    hub_config: str | None  # config name of the Hub dataset
    fields: tuple[str, ...]
    text_fields: tuple[str, ...]
    labels: tuple[str, ...]
    verbalizer: Mapping[str, str]
    init_text: str
    template: str  # the text before the answer cue; {field} placeholders
    answer_cue: str = ANSWER_CUE
    formatter: str | None = None  # a name in FORMATTERS
    allowed_values: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # per field, if closed
    int_fields: tuple[str, ...] = ()
    splits: tuple[str, ...] = SPLITS
    hub_dataset: str | None = None  # None: the run's --hub-dataset
    hub_splits: Mapping[str, str] = field(default_factory=lambda: dict(HUB_SPLITS))
    version: int = 1
    source: str = field(default="built-in", compare=False)
    declaration: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    _pieces: tuple = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "_pieces", parse_template(self.template))

    def format(self, ex: Mapping) -> str:
        """Example fields -> model input text: the filled template, then the answer cue.

        Only the fields the template (or the formatter) uses are read. Raises KeyError when one is missing.
        """
        values = {}
        if self.formatter is not None:
            values = {k: clean(v) for k, v in FORMATTERS[self.formatter].fn(ex).items()}
        parts = []
        for literal, name in self._pieces:
            parts.append(literal)
            if name is not None:
                parts.append(values[name] if name in values else clean(ex[name]))
        return "".join(parts) + self.answer_cue

    def target(self, label_index: int) -> str:
        """Label index -> target text: a space then the label's answer words."""
        return " " + self.verbalizer[self.labels[label_index]]

    @property
    def answers(self) -> tuple[str, ...]:
        """Target texts of all labels, in label order."""
        return tuple(self.target(i) for i in range(len(self.labels)))

    @property
    def digest(self) -> str:
        """12 hex digits of SHA-256 over the declaration (canonical JSON): which exact declaration a run used."""
        text = json.dumps(self.declaration, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
