"""Shared command-line pieces: one-line argument errors (exit 2), number argument types, and flags built from
config dataclasses (each field's ``metadata["help"]`` and default become its flag's help)."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import math
import types
import typing
from collections.abc import Iterable
from typing import Any

from ptray.errors import PtrayError
from ptray.seeds import MAX_SEED, check_seed


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (``error: ...``) and exits 2, like every ptray error."""

    def error(self, message):
        """Print ``error: message`` and exit with status 2."""
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _number(text: str, kind: type, minimum: float, strict: bool) -> Any:
    what = "integer" if kind is int else "number"
    bound = ("positive " if strict and minimum == 0 else "") + what + ("" if strict else f" >= {minimum:g}")
    bound = ("an " if bound[0] in "aeiou" else "a ") + bound
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {bound}, got {text!r}") from None
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (else ``ArgumentTypeError``)."""
    return _number(text, int, 0, strict=True)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (else ``ArgumentTypeError``)."""
    return _number(text, int, 0, strict=False)


def seed_int(text: str) -> int:
    """argparse type: a seed, an integer from 0 to ``ptray.seeds.MAX_SEED`` (else ``ArgumentTypeError``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be a seed from 0 to {MAX_SEED} (2**32 - 1), got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (else ``ArgumentTypeError``)."""
    return _number(text, float, 0, strict=True)


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (else ``ArgumentTypeError``)."""
    return _number(text, float, 0, strict=False)


def config_field(default: Any, help: str, **metadata: Any) -> Any:
    """A config dataclass field with its default and one-line help (PEFT's ``field(metadata={"help": ...})``).

    Optional ``metadata``: ``type`` (an argparse type such as ``positive_int``), ``choices``, ``flag`` (the flag's
    name when it is not ``--field-name``), ``off_help`` (the help of ``--no-field-name`` for a field that defaults
    to True), ``cli=False`` (no flag), ``hint`` (what a special value means, in ``check_config``'s message).
    """
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def _show_default(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return "unset" if value is None else str(value)


def add_config_arguments(parser, cls: type, exclude: Iterable[str] = (), required: Iterable[str] = (),
                         unset_defaults: bool = False, default_notes: dict[str, str] | None = None) -> list[str]:
    """Add one flag per field of the dataclass ``cls`` to ``parser`` (or an argument group); return the field names.

    ``--field-name`` takes the field's type (``metadata["type"]`` or the annotation: int, float, str, a ``str``
    Enum's values as choices); a bool field that defaults to False is a switch (``--compile``), one that defaults
    to True is switched off by ``--no-field-name``. ``unset_defaults``: every flag defaults to None, so a caller can
    tell what the command line actually said (the help still shows the field's default). ``default_notes`` adds
    text after a field's default in its help (e.g. what a preset changes).
    """
    hints = typing.get_type_hints(cls)
    exclude, required, notes = set(exclude), set(required), default_notes or {}
    names = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in exclude or not meta.get("cli", True) or "help" not in meta:
            continue
        names.append(f.name)
        flag = "--" + meta.get("flag", f.name.replace("_", "-"))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        # A field that defaults to None says in its help what "unset" means.
        shown = [] if default is None else [f"default: {_show_default(default)}"]
        shown += [notes[f.name]] if f.name in notes else []
        help_text = f"{meta['help']} ({'; '.join(shown)})" if shown and f.name not in required else meta["help"]
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
        if f.name in required:
            kwargs["required"] = True
        else:
            kwargs["default"] = None if unset_defaults else default
        annotation = _base_type(hints[f.name])
        if annotation is bool:  # a switch: its help says what it does, not a default
            if default:
                flag = "--no-" + flag[2:]
                kwargs.update(action="store_false", help=meta.get("off_help", f"do not {meta['help']}"))
            else:
                kwargs.update(action="store_true", help=meta["help"])
            if unset_defaults:
                kwargs["default"] = None
            parser.add_argument(flag, **kwargs)
            continue
        kwargs["type"] = meta.get("type", annotation if annotation in (int, float) else str)
        if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
            kwargs["choices"] = [e.value for e in annotation]
            if not unset_defaults and f.name not in required:
                kwargs["default"] = default.value
        if "choices" in meta:
            kwargs["choices"] = list(meta["choices"])
        parser.add_argument(flag, **kwargs)
    return names


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> ``int``; other annotations as they are."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args and typing.get_origin(annotation) in (typing.Union, types.UnionType) else annotation


def config_from_args(cls: type, args: argparse.Namespace, **fixed):
    """An instance of the dataclass ``cls`` from the flags ``add_config_arguments`` added, plus ``fixed`` values.

    Flags left unset (None) keep the field's default. Raises what ``cls`` raises for a bad value (``PtrayError``).
    """
    values = dict(fixed)
    for f in dataclasses.fields(cls):
        if f.name not in values and getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return cls(**values)


# What each argparse type of a config field means for a value set in code (``check_config``): kind, minimum, strict.
_RANGES = {
    positive_int: (int, "a positive integer", lambda v: v > 0),
    non_negative_int: (int, "a non-negative integer", lambda v: v >= 0),
    positive_float: (float, "a positive number", lambda v: math.isfinite(v) and v > 0),
    non_negative_float: (float, "a non-negative number", lambda v: math.isfinite(v) and v >= 0),
}


def _one_of(choices: list) -> str:
    return " or ".join(map(str, choices)) if len(choices) == 2 else f"one of {', '.join(map(str, choices))}"


def check_config(obj: Any) -> None:
    """Check every field of the config dataclass ``obj`` against what its ``config_field`` declares.

    The same rules as its flag (``type``: ``positive_int``, ``non_negative_int``, ``positive_float``,
    ``non_negative_float``, ``seed_int``; ``choices``; a ``str`` Enum annotation; bool), for values set in code or
    read from a stored plan, where no argparse ran. None passes where the field's default is None (unset). Enum
    fields given as their string value are converted in place. Raises PtrayError naming the field and the value.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        meta, value = f.metadata, getattr(obj, f.name)
        if "help" not in meta or (value is None and f.default is None):
            continue
        unset = " or unset" if f.default is None else ""
        annotation = _base_type(hints[f.name])
        if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
            try:
                object.__setattr__(obj, f.name, annotation(value))
            except ValueError:
                raise PtrayError(f"{f.name} must be one of {[e.value for e in annotation]}, got {value!r}") from None
        elif annotation is bool:
            if not isinstance(value, bool):
                raise PtrayError(f"{f.name} must be true or false, got {value!r}")
        kind = meta.get("type")
        if kind is seed_int:
            check_seed(value, f.name)
        elif kind in _RANGES:
            number, words, ok = _RANGES[kind]
            allowed = (int,) if number is int else (int, float)
            if isinstance(value, bool) or not isinstance(value, allowed) or not ok(value):
                hint = f" ({meta['hint']})" if "hint" in meta else ""
                raise PtrayError(f"{f.name} must be {words}{unset}{hint}, got {value!r}")
        if "choices" in meta and value not in meta["choices"]:
            raise PtrayError(f"{f.name} must be {_one_of(list(meta['choices']))}, got {value!r}")
