"""The command-line flags the benchmark scripts share (``bench.py``, ``gpu.py``, ``trial_memory.py``): the same
name, meaning and error line in each."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from ptray.cli import OneLineParser, positive_float, positive_int

ROOT = Path(__file__).resolve().parents[1]


def add_data_dir_argument(p: argparse.ArgumentParser) -> None:
    """Add ``--data-dir``, the SuperGLUE jsonl folder."""
    default = os.environ.get("PTRAY_DATA_DIR", str(ROOT.parent / "shared" / "data" / "superglue"))
    p.add_argument("--data-dir", default=default, help="the SuperGLUE jsonl folder (default: $PTRAY_DATA_DIR, else "
                                                       "../shared/data/superglue beside the checkout)")


def check_data_dir(p: argparse.ArgumentParser, data_dir: str) -> None:
    """Exit with one line (argparse's ``error``, status 2) when ``data_dir`` is not a folder."""
    if not Path(data_dir).is_dir():
        p.error(f"--data-dir {data_dir!r} is not a folder; pass the SuperGLUE jsonl folder or set PTRAY_DATA_DIR")


def names_argument(p: argparse.ArgumentParser, flag: str, text: str, valid) -> list[str]:
    """A comma-separated list of names, each one of ``valid`` (else a one-line error)."""
    names = [x for x in text.split(",") if x]
    for x in names:
        if x not in valid:
            p.error(f"{flag}: unknown name {x!r}; valid: {', '.join(valid)}")
    return names


def counts_argument(p: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    """A comma-separated list of positive integers, e.g. "4,16" (else a one-line error)."""
    try:
        return [positive_int(x) for x in text.split(",") if x]
    except argparse.ArgumentTypeError as err:
        p.error(f"{flag} takes positive integers separated by commas, e.g. 4,16: {err}")


def run_parser(description: str, sections) -> OneLineParser:
    """A parser with the flags every measuring script has: ``--smoke``, ``--device``, ``--data-dir``,
    ``--threads``, ``--time-budget``, ``--sections`` (a subset of ``sections``), ``--out``, ``--md`` and
    ``--render-only``. ``finish_run_args`` checks them."""
    p = OneLineParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps: checks that everything runs")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_data_dir_argument(p)
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's own; 1 steadies timings on a shared machine)")
    p.add_argument("--time-budget", type=positive_float, default=None,
                   help="seconds; optional sections that would end later are skipped")
    p.add_argument("--sections", default=",".join(sections),
                   help=f"which measurements to run, any of {','.join(sections)} (the matmul peak always runs)")
    p.add_argument("--out", default=None, help="write all numbers here (JSON), again after every section")
    p.add_argument("--md", default=None, help="markdown file whose '<!-- bench:KEY -->' section to replace")
    p.add_argument("--render-only", action="store_true",
                   help="measure nothing: load --out and redo the markdown from it")
    return p


def finish_run_args(p: argparse.ArgumentParser, a, sections) -> None:
    """Check and resolve the shared flags in place: the data folder, ``--render-only``'s results file, the device
    (auto: cuda when visible), ``--sections`` (into a list)."""
    check_data_dir(p, a.data_dir)
    if a.render_only and not (a.out and Path(a.out).is_file()):
        p.error(f"--render-only renders a results file: pass --out RESULTS.json (got {a.out!r}, not a file)")
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for but no CUDA GPU is visible")
    a.sections = names_argument(p, "--sections", a.sections, sections)
