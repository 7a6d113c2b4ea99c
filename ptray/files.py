"""Small file helpers shared by every writer: JSON files and folders that appear whole or not at all."""

from __future__ import annotations

import contextlib
import errno
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


# A write that failed for want of space: the disk is full, or the user's quota is.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


DISK_FULL_WORDS = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))  # "No space left on device", ...


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` is a write refused for want of space: an ``OSError`` ENOSPC or EDQUOT, or a library's own
    exception that carries the OS's words (safetensors: "I/O error: No space left on device (os error 28)")."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno in DISK_FULL_ERRNOS
    return any(words in str(err) for words in DISK_FULL_WORDS)


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover - the loop returns


PARTIAL = ".partial-"  # in the name of ``atomic_folder``'s temporary sibling: ``.NAME.partial-XXXX``


def disk_full_error(folder: str | Path) -> PtrayError:
    """The one line for a write into ``folder`` that ran out of space: the folder (an ``atomic_folder``'s
    temporary sibling named by the folder it would have become: it is gone by then), the space left on its disk
    (``shutil.disk_usage``, in decimal units) and what to do."""
    folder = Path(*[re.sub(rf"^\.(.+){re.escape(PARTIAL)}[^/]*$", r"\1", part) for part in Path(folder).parts])
    existing = folder.expanduser().absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = f"{_size(shutil.disk_usage(existing).free)} free"
    except OSError:  # gone meanwhile: the message still names the folder
        free = "free space unknown"
    return PtrayError(f"no space left on the disk of {folder} ({free}); nothing was left half-written: free some "
                      f"space (or choose another folder) and run the command again (a study: with --resume)")


def disk_full_from(err: OSError) -> PtrayError:
    """``disk_full_error`` for a disk-full ``err`` caught where no folder is known (an entry point's last resort):
    the folder of the file it names, else the working directory."""
    return disk_full_error(Path(err.filename).parent if err.filename else Path.cwd())


@contextlib.contextmanager
def disk_space(folder: str | Path) -> Iterator[None]:
    """Inside the block, a write refused for want of space (``is_disk_full``) becomes ``disk_full_error(folder)``
    (a ``PtrayError``: one line, not a library's or the OS's traceback); any other error passes unchanged."""
    try:
        yield
    except PtrayError:
        raise
    except Exception as err:  # noqa: BLE001 - OSError, or a library's error that says the disk is full
        if is_disk_full(err):
            raise disk_full_error(folder) from None
        raise


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented strict JSON (keys in insertion order) with a final newline; return the path.

    The file appears whole or not at all (written beside it, then renamed over it); a full disk is
    ``disk_full_error`` (``PtrayError``). Non-finite floats become null, with one warning naming the file and each
    value replaced (strict JSON has no NaN or Infinity, and readers such as ``jq`` or JavaScript refuse them)."""
    path = Path(path)
    clean, notes = strict_json(obj)
    if notes:
        log.warning("%s: non-finite values written as null: %s", path.name, "; ".join(notes))
    text = json.dumps(clean, indent=2, allow_nan=False) + "\n"
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with disk_space(path.parent):
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def atomic_folder(out: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out`` to fill; on success it is renamed to ``out``.

    A failure inside the block removes the temporary folder, so ``out`` is never half-written; a full disk, there
    or in the block, is ``disk_full_error`` naming ``out`` (``PtrayError``), said after the partial copy is gone.
    ``replace``: an existing ``out`` is removed first; otherwise an ``out`` that appears meanwhile (another process
    on this node won the race with an identical copy) is kept and ours discarded.
    """
    out = Path(out)
    with disk_space(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL}", dir=out.parent))
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
