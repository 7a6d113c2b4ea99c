"""What a run records about the code that made it: ptray's version (and git commit) and the library versions its
numbers depend on."""

from __future__ import annotations

import subprocess
from pathlib import Path

import ptray


def code_version() -> str:
    """ptray's version, plus the git commit when run from a checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{ptray.__version__}+{sha}" if sha else ptray.__version__


def library_versions() -> dict[str, str]:
    """The installed versions of the libraries ptray's numbers depend on, as run params (``torch_version``, ...)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "accelerate"):
        try:
            out[f"{name}_version"] = version(name)
        except PackageNotFoundError:
            out[f"{name}_version"] = "not installed"
    return out
