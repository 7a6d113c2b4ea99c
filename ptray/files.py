"""Small file helpers shared by every writer: JSON files and folders that appear whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (keys in insertion order) with a final newline; return the path."""
    path = Path(path)
    path.write_text(json.dumps(obj, indent=2) + "\n")
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


def looks_like_path(name: str) -> bool:
    """Whether ``name`` (a ``--model`` value that is not an existing folder) reads as a path rather than a Hub id.

    Hub ids are ``name`` or ``org/name``; ``./m``, ``../m``, ``/abs``, ``~/m``, ``a/b/c`` and Windows paths are paths,
    so a missing one is a mistyped path, refused at once instead of looked up on the Hub.
    """
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
