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
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from ptray.data.task import (
    ANSWER_CUE,
    FORMATTERS,
    HUB_SPLITS,
    IDENTIFIER,
    SPLITS,
    Task,
    parse_template,
)
from ptray.errors import PtrayError

FIELD_TYPES = ("text", "string", "int")
RESERVED_FIELDS = ("idx", "label")  # every record has them; a task does not declare them
_NAME = re.compile(r"[a-z][a-z0-9_-]*\Z")
BOM = "\ufeff"  # the UTF-8 byte-order mark as text: what "utf-8" decoding keeps and "utf-8-sig" drops

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
        if not IDENTIFIER.match(name):
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
    """TOML text -> the declaration dict (not validated; ``task_from_declaration`` does that). A leading UTF-8
    byte-order mark (Windows editors write one) is dropped: TOML forbids it, but it is no part of the content.

    Raises:
        PtrayError: the text is not valid TOML (the message names ``source``, the line and the column).
    """
    try:
        return tomllib.loads(text.removeprefix(BOM))
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
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is read, not kept
    except UnicodeDecodeError:
        raise PtrayError(f"{path}: not UTF-8 text (a task file is TOML)") from None
    return parse_task_toml(text, str(path))
