"""Small folders (the smoke model, the SuperGLUE files) carried to every node as bytes through Ray's object store,
so that no node needs a shared disk; written once per node into its ptray cache."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ptray.files import atomic_folder

COMPLETE = ".complete"  # marks a cache folder whose files are all written


def cache_dir() -> Path:
    """This node's ptray cache, absolute: $PTRAY_CACHE, else $XDG_CACHE_HOME/ptray, else ~/.cache/ptray.

    Absolute because the smoke model's folder in it is logged as the study's model and read later (the analysis)
    from any directory. A relative $PTRAY_CACHE still names a folder in each process's working directory (a trial's
    is its own folder): set an absolute one to share one copy per node.
    """
    if os.environ.get("PTRAY_CACHE"):
        return Path(os.environ["PTRAY_CACHE"]).expanduser().resolve()
    return (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ptray").expanduser().resolve()


@dataclass(frozen=True)
class Bundle:
    """A small folder carried to every node as bytes, written once per node.

    ``files`` maps a path relative to the folder to its bytes; ``digest`` (16 hex digits of a SHA-256 over the
    paths and contents) names the folder on each node and tells ``--resume`` whether the files changed.
    """

    files: dict[str, bytes]
    digest: str

    @classmethod
    def pack(cls, root: str | Path, relpaths: list[str] | None = None) -> Bundle:
        """Read ``relpaths`` (default: every file under ``root``) into a bundle."""
        root = Path(root)
        if relpaths is None:
            relpaths = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        files = {rel: (root / rel).read_bytes() for rel in relpaths}
        sha = hashlib.sha256()
        for rel in sorted(files):
            sha.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
        return cls(files, sha.hexdigest()[:16])

    def file_digests(self) -> dict[str, str]:
        """Each file's 16 hex digits of SHA-256 over its bytes, by relative path: what ``--resume`` names when the
        bundle's ``digest`` differs from the one a study started with."""
        return {rel: hashlib.sha256(data).hexdigest()[:16] for rel, data in sorted(self.files.items())}

    def materialize(self, base: str | Path | None = None) -> Path:
        """Write the files under a node-local folder named by their digest; concurrent trials share one copy."""
        out = Path(base or cache_dir()) / self.digest
        if (out / COMPLETE).is_file():
            return out
        # Another trial on this node may win the race: its copy is identical, and ours is dropped.
        with atomic_folder(out, replace=False) as tmp:
            for rel, data in self.files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
            (tmp / COMPLETE).touch()
        return out


def tiny_model_bundle() -> Bundle:
    """A tiny random BLOOM (``ptray.tiny_model``), built here, as a bundle: the smoke study's model."""
    from ptray.lm.tiny_model import build

    with tempfile.TemporaryDirectory(prefix="ptray-tiny-") as tmp:
        return Bundle.pack(build(Path(tmp) / "model"))
