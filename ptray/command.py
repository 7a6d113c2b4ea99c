"""The ``ptray`` command: one entry point, a subcommand for each thing a user runs.

    ptray train ...            one soft prompt -> a run folder           (also: python -m ptray.train)
    ptray study ...            the whole study on Ray Tune + MLflow     (also: python sweeps/all.py)
    ptray analyse ...          the report of a study tracked in MLflow  (also: python -m analysis)
    ptray model prepare|ask|list|tiny ...   models offline
    ptray publish STUDY_DIR    a local study (ptray study --local DIR) into MLflow
    ptray slurm ... -- ...     the study as a SLURM batch job (a script for sbatch; --submit submits it)

Each subcommand's flags come from the config dataclasses (``ptray.config``); ``ptray SUBCOMMAND --help`` lists them.

ptray never imports the analysis (it sits above ptray): ``ptray analyse`` and the analysis at the end of ``ptray
study`` are found through the entry points the analysis package declares in pyproject.toml (groups
``ptray.commands`` and ``ptray.analysis``), the standard plugin mechanism of Python packaging. Without them installed,
``ptray analyse`` says how to install them and ``ptray study`` skips its analysis step, saying so.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib.metadata import entry_points

# name -> (one-line help, "module:function"); each function is main(argv, prog) -> exit status
BUILTIN = {
    "train": ("train and evaluate one soft prompt into a run folder", "ptray.training.train:main"),
    "study": ("the whole study: Ray Tune over task x seed, the transfer grid, MLflow, then the analysis",
              "ptray.study.driver:main"),
    "slurm": ("the study as a SLURM batch job: Ray's head and workers across its nodes, resubmitted to resume",
              "ptray.study.slurm:main"),
    "model": ("models offline: prepare a real small model, ask it a question, build a tiny random one",
              "ptray.lm.pretrained:main"),
    "publish": ("a local study's run folders (ptray study --local DIR) into MLflow, idempotent",
                "ptray.study.publish:main"),
}
PLUGINS = {  # subcommands another installed package provides; shown in --help even when missing
    "analyse": "the report of a study tracked in MLflow: figures, tables, report.html (the analysis package)",
}


def _load(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(__import__(module, fromlist=[name]), name)


def _plugin(group: str, name: str) -> Callable | None:
    """The object the entry point ``name`` of ``group`` names, or None when no installed package declares it."""
    for ep in entry_points(group=group):
        if ep.name == name:
            return ep.load()
    return None


def analysis_hook() -> Callable | None:
    """``analysis.run`` when the analysis package is installed (entry point group ``ptray.analysis``), else None."""
    return _plugin("ptray.analysis", "run")


def usage() -> str:
    """``ptray --help``: every subcommand with its one line."""
    names = {**{k: v[0] for k, v in BUILTIN.items()}, **PLUGINS}
    width = max(map(len, names))
    lines = ["usage: ptray SUBCOMMAND [--help] ...", "",
             "Prompt tuning on SuperGLUE at study scale: train, transfer and interpret soft prompts.", "",
             "subcommands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in names.items()]
    lines += ["", "ptray SUBCOMMAND --help lists its flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``ptray SUBCOMMAND ARGS``; returns the exit status (2 with one ``error:`` line for an unknown one)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from ptray.versions import code_version

        print(f"ptray {code_version()}")
        return 0
    name, rest = argv[0], argv[1:]
    prog = f"ptray {name}"
    if name in BUILTIN:
        run = _load(BUILTIN[name][1])
        if name == "study":
            return run(rest, analyse=analysis_hook(), prog=prog)
        return run(rest, prog=prog)
    if name in PLUGINS:
        run = _plugin("ptray.commands", name)
        if run is None:
            print(f"error: ptray {name} comes with the analysis package, which is not installed here; install "
                  f"ptray with its analysis extra (pip install -e '.[analysis]') or run python -m analysis",
                  file=sys.stderr)
            return 2
        return run(rest, prog=prog)
    import difflib

    close = difflib.get_close_matches(name, [*BUILTIN, *PLUGINS], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    print(f"error: unknown subcommand {name!r}{hint} (see ptray --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
