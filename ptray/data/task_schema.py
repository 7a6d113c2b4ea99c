"""Task declarations: the task-file schema (TOML), its validation, the ``Task`` it builds, and the formatters.

A task is data: one TOML file declares where its examples are, which fields a record has, how a record becomes
model text, the answer words of each label and the init text. ptray ships the paper's four tasks and WiC this way
(``ptray/data/task_files/*.toml``); a user's file has the same schema. The CB file, annotated::

    name = "cb"             # ASCII lower case letters, digits, '-', '_'; starts with a letter
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
from ptray.files import NAME_MAX, name_problem

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
    """The checks of one task declaration, one method per part of the file; each failure is one line
    ``PtrayError`` prefixed with the declaration's source. ``declaration`` runs them in the file's reading order:
    the top level, name and version, ``[fields]``, labels and ``[verbalizer]``, the formatter, the template and
    answer cue, ``[data]``."""

    def __init__(self, source: str):
        self.source = source

    # --- the parts of a task file -----------------------------------------------------------------------------

    def declaration(self, declaration: Any) -> Task:
        """The whole declaration -> its ``Task``."""
        decl = self.table(declaration, "<top level>")
        self.known(decl, _TOP)
        self.required(decl, _REQUIRED)
        name = self.name(decl["name"])
        version = self.version(decl["version"])
        init_text = self.string(decl["init_text"], "init_text")
        types, allowed = self.fields(self.table(decl["fields"], "fields"))
        labels = self.labels(decl["labels"])
        verbalizer = self.verbalizer(self.table(decl["verbalizer"], "verbalizer"), labels)
        formatter, provided = self.formatter(decl.get("formatter"), types)
        template = self.template(decl["template"], (*types, *provided))
        answer_cue = self.answer_cue(decl.get("answer_cue", ANSWER_CUE))
        data = self.data(self.table(decl["data"], "data"), name)
        return Task(
            name=name,
            fields=tuple(types),
            text_fields=tuple(f for f, kind in types.items() if kind == "text"),
            labels=labels,
            verbalizer=verbalizer,
            init_text=init_text,
            template=template,
            answer_cue=answer_cue,
            formatter=formatter,
            allowed_values=allowed,
            int_fields=tuple(f for f, kind in types.items() if kind == "int"),
            version=version,
            source=self.source,
            declaration=copy.deepcopy(dict(decl)),
            **data,
        )

    def name(self, value: Any) -> str:
        name = self.string(value, "name")
        # a task names runs and their folders (name_problem: folder-safe, at most 64 characters); lower case on
        # top, so that --tasks CB and cb are one task
        if not _NAME.match(name) or name_problem(name):
            self.fail(f"field 'name' must be ASCII lower case letters (a-z), digits, '-' or '_', starting with a "
                      f"letter, at most {NAME_MAX} characters; got {name!r}")
        return name

    def version(self, value: Any) -> int:
        if type(value) is not int or value < 1:
            self.fail(f"field 'version' must be an integer >= 1, got {_show(value)}")
        return value

    def fields(self, table: Mapping) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
        """[fields] -> ({name: type}, {name: allowed values})."""
        types: dict[str, str] = {}
        allowed: dict[str, tuple[str, ...]] = {}
        if not table:
            self.fail("field 'fields' declares no field")
        for name, spec in table.items():
            path = f"fields.{name}"
            if not IDENTIFIER.match(name):
                self.fail(f"field {path!r}: a field name must be letters, digits and '_' (it is a placeholder)")
            if name in RESERVED_FIELDS:
                self.fail(f"field {path!r}: 'idx' and 'label' are read from every record; do not declare them")
            if isinstance(spec, Mapping):
                self.known(spec, _FIELD, prefix=path + ".")
                self.required(spec, ("type",), prefix=path + ".")
                kind = self.string(spec["type"], path + ".type")
                if "values" in spec:
                    if kind == "int":
                        self.fail(f"field {path + '.values'!r}: only string fields can have a closed set of values")
                    allowed[name] = self.strings(spec["values"], path + ".values")
            else:
                kind = self.string(spec, path)
            if kind not in FIELD_TYPES:
                self.fail(f"field {path!r}: unknown type {kind!r} (valid: {', '.join(FIELD_TYPES)})"
                          f"{_did_you_mean(kind, FIELD_TYPES)}")
            types[name] = kind
        if "text" not in types.values():
            self.fail("field 'fields' declares no field of type 'text' (the one truncation may shorten)")
        return types, allowed

    def labels(self, value: Any) -> tuple[str, ...]:
        labels = self.strings(value, "labels")
        if len(labels) < 2:
            self.fail(f"field 'labels' needs at least two labels, got {list(labels)}")
        return labels

    def verbalizer(self, table: Mapping, labels: tuple[str, ...]) -> dict[str, str]:
        """[verbalizer] -> {label: answer words}, in the labels' order: every label, distinct single-spaced words."""
        for key in table:
            if key not in labels:
                self.fail(f"field 'verbalizer' names {key!r}, which is not a label (labels: {', '.join(labels)})")
        seen: dict[str, str] = {}
        for label in labels:
            if label not in table:
                self.fail(f"field 'verbalizer' has no answer words for label {label!r} (every label needs them)")
            words = self.string(table[label], f"verbalizer.{label}")
            if words != " ".join(words.split()):
                self.fail(f"field 'verbalizer.{label}': answer words must be single-spaced, without surrounding or "
                          f"inner newlines/tabs; got {words!r}")
            if words in seen:
                self.fail(f"field 'verbalizer': labels {seen[words]!r} and {label!r} share the answer {words!r} "
                          f"(exact match could not tell them apart)")
            seen[words] = label
        return {label: table[label] for label in labels}

    def formatter(self, formatter: Any, types: Mapping[str, str]) -> tuple[str | None, tuple[str, ...]]:
        """The optional formatter -> (its name or None, the placeholders it provides)."""
        if formatter is None:
            return None, ()
        self.string(formatter, "formatter")
        if formatter not in FORMATTERS:
            self.fail(f"field 'formatter': unknown formatter {formatter!r} (registered: "
                      f"{', '.join(FORMATTERS) or 'none'}){_did_you_mean(formatter, list(FORMATTERS))}")
        spec = FORMATTERS[formatter]
        for read in spec.reads:
            if read not in types:
                self.fail(f"field 'formatter': {formatter!r} reads field {read!r}, which 'fields' does not declare")
        for out in spec.provides:
            if out in types:
                self.fail(f"field 'formatter': {formatter!r} provides placeholder {out!r}, which is also a declared "
                          f"field; rename the field")
        return formatter, spec.provides

    def template(self, value: Any, known: tuple[str, ...]) -> str:
        """The template: valid brace syntax, every placeholder a declared field or a formatter's."""
        template = self.string(value, "template")
        try:
            pieces = parse_template(template)
        except ValueError as err:
            self.fail(f"field 'template': {err}")
        for _, placeholder in pieces:
            if placeholder is not None and placeholder not in known:
                hint = difflib.get_close_matches(placeholder, known, n=1)
                did = f"; did you mean {{{hint[0]}}}?" if hint else ""
                self.fail(f"field 'template': placeholder {{{placeholder}}} names no declared field (declared: "
                          f"{', '.join(known)}){did}")
        return template

    def answer_cue(self, value: Any) -> str:
        answer_cue = self.string(value, "answer_cue")
        if answer_cue != answer_cue.rstrip():
            self.fail(f"field 'answer_cue' must not end with whitespace (the answers start with a space); got "
                      f"{answer_cue!r}")
        return answer_cue

    def data(self, table: Mapping, name: str) -> dict[str, Any]:
        """[data] -> the ``Task`` fields it sets: dir_name, hub_config, hub_dataset, splits, hub_splits."""
        self.known(table, _DATA, prefix="data.")
        dir_name = self.string(table.get("dir_name", name), "data.dir_name")
        if "/" in dir_name or "\\" in dir_name or dir_name in (".", ".."):
            self.fail(f"field 'data.dir_name' must be one folder name, got {dir_name!r}")
        hub_config = self.string(table["hub_config"], "data.hub_config") if "hub_config" in table else None
        hub_dataset = self.string(table["hub_dataset"], "data.hub_dataset") if "hub_dataset" in table else None
        splits = self.strings(table.get("splits", list(SPLITS)), "data.splits")
        for split in splits:
            if split not in SPLITS:
                self.fail(f"field 'data.splits': unknown split {split!r} (valid: {', '.join(SPLITS)})")
        hub_splits = dict(HUB_SPLITS)
        if "hub_splits" in table:
            names = self.table(table["hub_splits"], "data.hub_splits")
            self.known(names, SPLITS, prefix="data.hub_splits.")
            hub_splits.update({k: self.string(v, f"data.hub_splits.{k}") for k, v in names.items()})
        return {"dir_name": dir_name, "hub_config": hub_config, "hub_dataset": hub_dataset,
                "splits": tuple(s for s in SPLITS if s in splits), "hub_splits": hub_splits}

    # --- the value checks the parts share ---------------------------------------------------------------------

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


def _did_you_mean(value: str, choices) -> str:
    hint = difflib.get_close_matches(value, choices, n=1)
    return f"; did you mean {hint[0]!r}?" if hint else ""


def _show(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text if len(text) <= 40 else text[:37] + '...'}"


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
    return _Check(source).declaration(declaration)


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
