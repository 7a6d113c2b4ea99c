"""Task declarations: the task-file schema (TOML), its validation, the ``Task`` it builds, and the formatters.

A task is data: one TOML file declares where its examples are, which fields a record has, how a record becomes
model text, the answer words of each label and the init text. ptray ships the paper's four tasks and WiC this way
(``ptray/data/task_files/*.toml``); a user's file has the same schema. The CB file, annotated::

    name = "cb"             # lower case letters, digits, '-', '_'; starts with a letter
    version = 1             # template version (an integer >= 1), logged with every run; bump it on any change
    labels = ["entailment", "contradiction", "neutral"]  # the record's 'label' values, as strings; order = index
    init_text = "Does the hypothesis entail, contradict or is neutral about the premise?"
    template = '''
    Premise: {premise}
    Hypothesis: {hypothesis}
    '''                     # '{field}' is a placeholder, '{{' and '}}' literal braces; TOML drops the first newline
    answer_cue = "Answer:"  # optional (default "Answer:"); appended to the filled template, directly
    # formatter = "copa"    # optional: a registered Python function filling extra placeholders (below)

    [fields]                # every field a record must have, in order, with its type:
    premise = "text"        #   "text": a string that truncation may shorten (at least one field is "text")
    hypothesis = "text"     #   "string": a string never cut; "int": an integer
    # question = { type = "string", values = ["cause", "effect"] }   # a closed set, checked when a record is read

    [verbalizer]            # label -> answer words: every label, distinct words, no surrounding whitespace
    entailment = "yes"
    contradiction = "no"
    neutral = "maybe"

    [data]
    dir_name = "CB"         # optional (default: the name): local files are <data_dir>/<dir_name>/<split>.jsonl
    hub_config = "cb"       # optional: the config of the Hub dataset
    # hub_dataset = "me/my_task"   # optional (default: the run's --hub-dataset, aps/super_glue)
    # hub_splits = { val = "validation" }  # optional: Hub split names (default train/validation/test)
    splits = ["train", "val", "test"]     # optional (default: all three): the splits that exist

A record (a jsonl line or a Hub row) holds the declared fields, an integer ``idx`` and a ``label`` (a label name,
or on the Hub its index; none or -1 on the test split). The model's text is the template filled with the
record's values, each with its whitespace runs collapsed to one space and its ends stripped, then the answer
cue; the target is a space, the label's answer words, then EOS.

A formatter is for logic a template cannot state (COPA's question sentence depends on its cause/effect field). It
is a Python function registered by name with ``register_formatter``: it reads declared fields and returns the
values of the placeholders it provides. Built in: ``copa`` (reads ``question``, provides ``question_text``).

Every mistake in a file is a one-line ``PtrayError`` naming the file and the field: ``cb.toml: field 'version'
must be an integer >= 1, got 0``.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from ptray.errors import PtrayError

ANSWER_CUE = "Answer:"
SPLITS = ("train", "val", "test")
FIELD_TYPES = ("text", "string", "int")
HUB_SPLITS = {"train": "train", "val": "validation", "test": "test"}
RESERVED_FIELDS = ("idx", "label")  # every record has them; a task does not declare them
_NAME = re.compile(r"[a-z][a-z0-9_-]*\Z")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
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
            if not _IDENTIFIER.match(name):
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


# --- validation ---------------------------------------------------------------------------------------------------

_TOP = ("name", "version", "labels", "init_text", "template", "answer_cue", "formatter", "fields", "verbalizer",
        "data")
_REQUIRED = ("name", "version", "labels", "init_text", "template", "fields", "verbalizer", "data")
_DATA = ("dir_name", "hub_config", "hub_dataset", "hub_splits", "splits")
_FIELD = ("type", "values")


class _Check:
    """Validation helpers that raise one-line PtrayErrors prefixed with the declaration's source."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, message: str):
        raise PtrayError(f"{self.source}: {message}")

    def known(self, table: Mapping, allowed: tuple[str, ...], prefix: str = "") -> None:
        for key in table:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                did = f"; did you mean {prefix + hint[0]!r}?" if hint else ""
                self.fail(f"unknown field {prefix + str(key)!r} (valid: {', '.join(prefix + a for a in allowed)}){did}")

    def required(self, table: Mapping, keys: tuple[str, ...], prefix: str = "") -> None:
        for key in keys:
            if key not in table:
                self.fail(f"field {prefix + key!r} is missing")

    def string(self, value: Any, path: str, nonempty: bool = True) -> str:
        if not isinstance(value, str):
            self.fail(f"field {path!r} should be a string, got {_show(value)}")
        if nonempty and not value.strip():
            self.fail(f"field {path!r} must not be empty")
        return value

    def table(self, value: Any, path: str) -> Mapping:
        if not isinstance(value, Mapping):
            self.fail(f"field {path!r} should be a table, got {_show(value)}")
        return value

    def strings(self, value: Any, path: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            self.fail(f"field {path!r} should be a non-empty list of strings, got {_show(value)}")
        for item in value:
            self.string(item, path)
        dup = sorted({v for v in value if value.count(v) > 1})
        if dup:
            self.fail(f"field {path!r} lists {dup[0]!r} twice")
        return tuple(value)


def _show(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text if len(text) <= 40 else text[:37] + '...'}"


def _declared_fields(check: _Check, table: Mapping) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """[fields] -> ({name: type}, {name: allowed values})."""
    types: dict[str, str] = {}
    allowed: dict[str, tuple[str, ...]] = {}
    if not table:
        check.fail("field 'fields' declares no field")
    for name, spec in table.items():
        path = f"fields.{name}"
        if not _IDENTIFIER.match(name):
            check.fail(f"field {path!r}: a field name must be letters, digits and '_' (it is a placeholder)")
        if name in RESERVED_FIELDS:
            check.fail(f"field {path!r}: 'idx' and 'label' are read from every record; do not declare them")
        if isinstance(spec, Mapping):
            check.known(spec, _FIELD, prefix=path + ".")
            check.required(spec, ("type",), prefix=path + ".")
            kind = check.string(spec["type"], path + ".type")
            if "values" in spec:
                if kind == "int":
                    check.fail(f"field {path + '.values'!r}: only string fields can have a closed set of values")
                allowed[name] = check.strings(spec["values"], path + ".values")
        else:
            kind = check.string(spec, path)
        if kind not in FIELD_TYPES:
            hint = difflib.get_close_matches(kind, FIELD_TYPES, n=1)
            did = f"; did you mean {hint[0]!r}?" if hint else ""
            check.fail(f"field {path!r}: unknown type {kind!r} (valid: {', '.join(FIELD_TYPES)}){did}")
        types[name] = kind
    if "text" not in types.values():
        check.fail("field 'fields' declares no field of type 'text' (the one truncation may shorten)")
    return types, allowed


def task_from_declaration(declaration: Mapping[str, Any], source: str = "<declaration>") -> Task:
    """Validate a task declaration (a parsed task file: a plain dict) and build its ``Task``.

    Args:
        declaration: the file's content (``tomllib.loads``), or a dict that ``task_declaration`` returned.
        source: where it comes from (a file path), the prefix of every error message.

    Returns:
        The Task; its ``declaration`` is a deep copy of ``declaration``.

    Raises:
        PtrayError: one line naming ``source`` and the field: unknown or missing field, wrong type, a placeholder
            naming no declared field, a verbalizer without every label, a version < 1, an unknown formatter...
    """
    check = _Check(source)
    decl = check.table(declaration, "<top level>")
    check.known(decl, _TOP)
    check.required(decl, _REQUIRED)

    name = check.string(decl["name"], "name")
    if not _NAME.match(name):
        check.fail(f"field 'name' must be lower case letters, digits, '-' or '_', starting with a letter; got "
                   f"{name!r}")
    version = decl["version"]
    if type(version) is not int or version < 1:
        check.fail(f"field 'version' must be an integer >= 1, got {_show(version)}")
    init_text = check.string(decl["init_text"], "init_text")

    types, allowed = _declared_fields(check, check.table(decl["fields"], "fields"))

    labels = check.strings(decl["labels"], "labels")
    if len(labels) < 2:
        check.fail(f"field 'labels' needs at least two labels, got {list(labels)}")
    verbalizer = check.table(decl["verbalizer"], "verbalizer")
    for key in verbalizer:
        if key not in labels:
            check.fail(f"field 'verbalizer' names {key!r}, which is not a label (labels: {', '.join(labels)})")
    seen: dict[str, str] = {}
    for label in labels:
        if label not in verbalizer:
            check.fail(f"field 'verbalizer' has no answer words for label {label!r} (every label needs them)")
        words = check.string(verbalizer[label], f"verbalizer.{label}")
        if words != " ".join(words.split()):
            check.fail(f"field 'verbalizer.{label}': answer words must be single-spaced, without surrounding or "
                       f"inner newlines/tabs; got {words!r}")
        if words in seen:
            check.fail(f"field 'verbalizer': labels {seen[words]!r} and {label!r} share the answer {words!r} (exact "
                       f"match could not tell them apart)")
        seen[words] = label

    formatter = decl.get("formatter")
    provided: tuple[str, ...] = ()
    if formatter is not None:
        check.string(formatter, "formatter")
        if formatter not in FORMATTERS:
            hint = difflib.get_close_matches(formatter, list(FORMATTERS), n=1)
            did = f"; did you mean {hint[0]!r}?" if hint else ""
            check.fail(f"field 'formatter': unknown formatter {formatter!r} (registered: "
                       f"{', '.join(FORMATTERS) or 'none'}){did}")
        spec = FORMATTERS[formatter]
        for read in spec.reads:
            if read not in types:
                check.fail(f"field 'formatter': {formatter!r} reads field {read!r}, which 'fields' does not declare")
        for out in spec.provides:
            if out in types:
                check.fail(f"field 'formatter': {formatter!r} provides placeholder {out!r}, which is also a declared "
                           f"field; rename the field")
        provided = spec.provides

    template = check.string(decl["template"], "template")
    try:
        pieces = parse_template(template)
    except ValueError as err:
        check.fail(f"field 'template': {err}")
    known = (*types, *provided)
    for _, placeholder in pieces:
        if placeholder is not None and placeholder not in known:
            hint = difflib.get_close_matches(placeholder, known, n=1)
            did = f"; did you mean {{{hint[0]}}}?" if hint else ""
            check.fail(f"field 'template': placeholder {{{placeholder}}} names no declared field (declared: "
                       f"{', '.join(known)}){did}")
    answer_cue = check.string(decl.get("answer_cue", ANSWER_CUE), "answer_cue")
    if answer_cue != answer_cue.rstrip():
        check.fail(f"field 'answer_cue' must not end with whitespace (the answers start with a space); got "
                   f"{answer_cue!r}")

    data = check.table(decl["data"], "data")
    check.known(data, _DATA, prefix="data.")
    dir_name = check.string(data.get("dir_name", name), "data.dir_name")
    if "/" in dir_name or "\\" in dir_name or dir_name in (".", ".."):
        check.fail(f"field 'data.dir_name' must be one folder name, got {dir_name!r}")
    hub_config = check.string(data["hub_config"], "data.hub_config") if "hub_config" in data else None
    hub_dataset = check.string(data["hub_dataset"], "data.hub_dataset") if "hub_dataset" in data else None
    splits = check.strings(data.get("splits", list(SPLITS)), "data.splits")
    for split in splits:
        if split not in SPLITS:
            check.fail(f"field 'data.splits': unknown split {split!r} (valid: {', '.join(SPLITS)})")
    hub_splits = dict(HUB_SPLITS)
    if "hub_splits" in data:
        table = check.table(data["hub_splits"], "data.hub_splits")
        check.known(table, SPLITS, prefix="data.hub_splits.")
        hub_splits.update({k: check.string(v, f"data.hub_splits.{k}") for k, v in table.items()})

    return Task(
        name=name,
        dir_name=dir_name,
        hub_config=hub_config,
        fields=tuple(types),
        text_fields=tuple(f for f, kind in types.items() if kind == "text"),
        labels=labels,
        verbalizer={label: verbalizer[label] for label in labels},
        init_text=init_text,
        template=template,
        answer_cue=answer_cue,
        formatter=formatter,
        allowed_values=allowed,
        int_fields=tuple(f for f, kind in types.items() if kind == "int"),
        splits=tuple(s for s in SPLITS if s in splits),
        hub_dataset=hub_dataset,
        hub_splits=hub_splits,
        version=version,
        source=source,
        declaration=copy.deepcopy(dict(decl)),
    )


def parse_task_toml(text: str, source: str = "<task file>") -> dict[str, Any]:
    """TOML text -> the declaration dict (not validated; ``task_from_declaration`` does that).

    Raises:
        PtrayError: the text is not valid TOML (the message names ``source``, the line and the column).
    """
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise PtrayError(f"{source}: not valid TOML ({' '.join(str(err).split())})") from None


def read_task_file(path: str | Path) -> dict[str, Any]:
    """A task file's declaration (a dict), read and parsed, not validated.

    Raises:
        PtrayError: the file does not exist, is not UTF-8, or is not valid TOML.
    """
    path = Path(path)
    if not path.is_file():
        raise PtrayError(f"task file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PtrayError(f"{path}: not UTF-8 text (a task file is TOML)") from None
    return parse_task_toml(text, str(path))
