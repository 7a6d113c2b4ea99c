"""Small file helpers shared by every writer: JSON files and folders that appear whole or not at all."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ptray.errors import PtrayError

log = logging.getLogger("ptray")


def strict_json(obj: Any, where: str = "") -> tuple[Any, list[str]]:
    """``obj`` with every non-finite float (NaN, +-inf, which strict JSON cannot hold) replaced by None, and where
    they were (``"[0].eval_loss"``-style paths under ``where``)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, [f"{where or '.'} was {obj}"]
    if isinstance(obj, dict):
        out, notes = {}, []
        for k, v in obj.items():
            out[k], more = strict_json(v, f"{where}.{k}")
            notes += more
        return out, notes
    if isinstance(obj, (list, tuple)):
        out, notes = [], []
        for i, v in enumerate(obj):
            value, more = strict_json(v, f"{where}[{i}]")
            out.append(value)
            notes += more
        return out, notes
    return obj, []


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented strict JSON (keys in insertion order) with a final newline; return the path.

    Non-finite floats become null, with one warning naming the file and each value replaced (strict JSON has no
    NaN or Infinity, and readers such as ``jq`` or JavaScript refuse them)."""
    path = Path(path)
    clean, notes = strict_json(obj)
    if notes:
        log.warning("%s: non-finite values written as null: %s", path.name, "; ".join(notes))
    path.write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n")
    return path


@contextlib.contextmanager
def atomic_folder(out: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out`` to fill; on success it is renamed to ``out``.

    A failure inside the block removes the temporary folder, so ``out`` is never half-written. ``replace``: an
    existing ``out`` is removed first; otherwise an ``out`` that appears meanwhile (another process on this node
    won the race with an identical copy) is kept and ours discarded.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if replace and out.exists():
            shutil.rmtree(out)
        try:
            os.rename(tmp, out)
        except OSError:
            if replace:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# A name that becomes a folder (a study id, an experiment's report folder, a task or condition in run-folder names):
# ASCII only, so that it is one folder with the same spelling on every filesystem and in every shell; no '/', no
# '..' and no leading '.' (a hidden folder, or the way out of the folder it is meant to live in).
NAME_RULE = "ASCII letters (a-z, A-Z), digits, '-', '_' and '.', starting with a letter or digit"
NAME_MAX = 64
EXPERIMENT_MAX = 100  # an experiment's name: ptray-<study> and room to spare
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def name_problem(name: str, max_length: int = NAME_MAX) -> str | None:
    """What makes ``name`` unfit to be a folder name, as words a user reads (None: it is fit).

    Fit: ``NAME_RULE`` (``[A-Za-z0-9][A-Za-z0-9_.-]*``, so never ``/``, ``..``, a leading ``.``, a space or a
    non-ASCII letter such as ``é``), 1 to ``max_length`` characters.

    >>> name_problem("cb-seed0.v2") is None
    True
    >>> name_problem("../x")
    "use only ASCII letters (a-z, A-Z), digits, '-', '_' and '.', starting with a letter or digit"
    """
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        return f"use only {NAME_RULE}"
    if len(name) > max_length:
        return f"at most {max_length} characters (it has {len(name)})"
    return None


def check_name(name: str, what: str, why: str, max_length: int = NAME_MAX) -> str:
    """``name`` unchanged when it may become a folder name (``name_problem``); otherwise one line.

    Args:
        name: the name as the user gave it.
        what: how the user gave it (``--study``, ``--experiment``), first in the message.
        why: which folder it becomes, and any way around the rule (``or pass --out``).
        max_length: the most characters allowed.

    Raises:
        PtrayError: ``"{what} {name!r}: use only ASCII letters ... ({why})"``.
    """
    problem = name_problem(name, max_length)
    if problem:
        raise PtrayError(f"{what} {name!r}: {problem} ({why})")
    return name


def looks_like_path(name: str) -> bool:
    """Whether ``name`` (a ``--model`` value that is not an existing folder) reads as a path rather than a Hub id.

    Hub ids are ``name`` or ``org/name``; ``./m``, ``../m``, ``/abs``, ``~/m``, ``a/b/c`` and Windows paths are paths,
    so a missing one is a mistyped path, refused at once instead of looked up on the Hub.
    """
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def check_output_folder(path: str | Path, flag: str, overwrite: bool = False, holds: str = "files",
                        reusable: Callable[[Path], bool] | None = None, fix: str = "or pass --overwrite") -> Path:
    """Refuse, before any work, an output folder that could not be written at the end; return it as a Path.

    Refused (PtrayError, one line naming ``flag``): a path that exists and is no folder; a path under a regular
    file; a path whose nearest existing folder is not writable; a folder that already holds something (``holds``
    says what), unless ``overwrite`` or ``reusable(path)`` (e.g. an earlier report a re-run replaces). ``fix`` ends
    the last message (``or delete it`` where no ``--overwrite`` exists). Nothing is created.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise PtrayError(f"{flag} {str(out)!r} exists and is not a folder; choose another {flag}")
    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise PtrayError(f"{flag} {str(out)!r} lies under {str(ancestor)!r}, which is a file, not a folder; "
                         f"choose another {flag}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PtrayError(f"{flag} {str(out)!r} cannot be written: no write permission on {str(ancestor)!r}; "
                         f"choose another {flag}")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not (reusable and reusable(out)):
        raise PtrayError(f"{flag} {str(out)!r} already holds {holds}; choose a new {flag} {fix}")
    return out
