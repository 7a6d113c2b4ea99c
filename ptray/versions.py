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


def compute_settings() -> dict[str, object]:
    """How this process computes on the CPU, as run params: what makes the same plan give other numbers on another
    machine or under another scheduler (a sum split over more threads is added in another order).

    Returns ``torch_threads`` (``torch.get_num_threads()``, intra-op), ``torch_interop_threads``, ``blas`` (torch's
    build: ``mkl``, ``openblas``, ...), ``onednn`` (oneDNN's version, ``off`` when unavailable or disabled) and
    ``cpu_capability`` (the vector instructions torch's kernels use: ``AVX512``, ``AVX2``, ``DEFAULT``, ...).
    """
    import re

    import torch

    shown = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=([^,\s]+)", shown)
    onednn = re.search(r"(?:MKL-DNN|oneDNN)\D*v?(\d+(?:\.\d+)+)", shown)
    use_onednn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    return {"torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "blas": blas.group(1) if blas else "unknown",
            "onednn": (onednn.group(1) if onednn else "on") if use_onednn else "off",
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
