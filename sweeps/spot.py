"""SPoT (Vu et al. 2021) as a two-phase study: the source prompts first, then every target tuned from them.

    python sweeps/spot.py --smoke --data-dir ../shared/data/superglue --tasks cb,rte --seeds 0   # minutes on CPUs
    python sweeps/spot.py --data-dir ~/data/superglue                    # sweeps/studies/spot.toml as declared

The declaration (``--study``, default ``spot``: ``sweeps/studies/spot.toml``) holds the tasks, seeds, the source
prompts' ``[train]`` budget, ``[conditions.text]`` (the target from its init text) and ``[conditions.spot]`` (the
target from a source prompt: ``init = "prompt"``, ``init_source = "{source}-seed{seed}"``). This script writes two
declared studies to ``outputs/spot/`` and runs each with ``sweeps/all.py``'s driver, in one MLflow experiment
(``--experiment``, default ``ptray-NAME``):

1. ``NAME-sources``: every (task, seed) prompt at ``[train]``'s budget, and its transfer grid (no analysis).
2. ``NAME``: conditions ``text`` and ``from-SOURCE`` for every trained SOURCE, on every task and seed: the target's
   prompt starts from SOURCE's phase-1 prompt of the same seed, named by phase 1's study id
   (``NAME-sources/cb-seed0``, tagged ``ptray.init_from``), both at the short budget; then the transfer grid and
   the analysis.

With ``--smoke`` each run is a new pair of studies, ``NAME-sources-smoke-<date>-<time>`` and
``NAME-smoke-<date>-<time>`` (one stamp), in its own experiment ``ptray-NAME-smoke-<date>-<time>``: a smoke run never
lands in the real study's experiment, and a second one never meets the first's sources. Resume one with
``--resume --smoke --study NAME-smoke-<date>-<time>`` (printed when it starts).

Every other flag goes to both phases as ``sweeps/all.py`` takes it (``--smoke``, ``--data-dir``, ``--task-file``,
``--targets``, ``--tracking-uri``, ...). ``--spot-epochs N`` sets phase 2's budget (default: the declaration's;
with ``--smoke`` the smoke budget). ``--resume`` continues both phases (a phase that never started is started).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import analysis
from ptray.data.tasks import register_task_files
from ptray.errors import PtrayError
from ptray.plan import SMOKE_TRAIN
from ptray.study import driver, flags, store, tracking
from ptray.study.declared import StudyDeclaration
from ptray.study.study_file import load_study

SOURCE = "{source}"  # in [conditions.spot]'s init_source: the source task


def _toml(value: Any) -> str:
    """A TOML value of the plain kinds a declaration holds (JSON spells strings, numbers, booleans and arrays as
    TOML does)."""
    return json.dumps(value)


def study_ids(name: str, stamp: str | None = None) -> tuple[str, str]:
    """The study ids of the two phases of SPoT declaration ``name``: ``(NAME-sources, NAME)``; a smoke run's
    (``stamp``, ``<date>-<time>``): ``(NAME-sources-smoke-STAMP, NAME-smoke-STAMP)``."""
    suffix = f"-smoke-{stamp}" if stamp else ""
    return f"{name}-sources{suffix}", f"{name}{suffix}"


def phase_texts(decl: StudyDeclaration, tasks: tuple[str, ...], seeds: tuple[int, ...],
                spot_epochs: int | None = None, ids: tuple[str, str] | None = None) -> tuple[str, str]:
    """The two declared studies of ``decl``'s SPoT run on ``tasks`` x ``seeds`` (TOML text): the sources (its
    ``[train]``, no conditions) and the targets (``text`` and ``from-SOURCE`` for each of ``tasks``), named
    ``ids`` (default ``study_ids(decl.name)``). A target's init_source that names a run (no ``/``) names it in the
    sources' study (``NAME-sources/cb-seed{seed}``): unambiguous in an experiment that holds other studies.

    Raises:
        PtrayError: ``decl`` lacks ``[conditions.text]`` or ``[conditions.spot]``, or the latter's init_source
            does not name ``{source}``.
    """
    if set(decl.conditions) != {"text", "spot"}:
        raise PtrayError(f"{decl.source}: a SPoT study declares [conditions.text] and [conditions.spot], got "
                         f"{', '.join(decl.conditions) or 'none'}")
    spot = dict(decl.conditions["spot"])
    if spot.get("init") != "prompt" or SOURCE not in str(spot.get("init_source", "")):
        raise PtrayError(f"{decl.source}: [conditions.spot] needs init = \"prompt\" and an init_source naming "
                         f"{SOURCE} (e.g. \"{{source}}-seed{{seed}}\")")
    sources_id, targets_id = ids or study_ids(decl.name)
    head = [f"tasks = {_toml(list(tasks))}", f"seeds = {_toml(list(seeds))}", "", "[train]"]
    head += [f"{k} = {_toml(v)}" for k, v in decl.train.items()]
    sources = "\n".join([f"name = {_toml(sources_id)}",
                         f"description = {_toml('SPoT sources: ' + decl.description)}", *head, ""])
    template = spot["init_source"]
    if "/" not in template:  # a run name: of this run's phase 1, not of any other study of the experiment
        template = f"{sources_id}/{template}"
    conditions = {"text": dict(decl.conditions["text"])}
    for task in tasks:
        conditions[f"from-{task}"] = {**spot, "init_source": template.replace(SOURCE, task)}
    if spot_epochs is not None:
        for over in conditions.values():
            over["max_epochs"] = spot_epochs
    lines = [f"name = {_toml(targets_id)}", f"description = {_toml(decl.description)}", *head]
    for name, over in conditions.items():
        lines += ["", f"[conditions.{_toml(name)}]", *(f"{k} = {_toml(v)}" for k, v in over.items())]
    return sources, "\n".join(lines + [""])


def build_parser() -> argparse.ArgumentParser:
    """The flags this script reads itself; every other one goes to both phases."""
    p = argparse.ArgumentParser(prog="python sweeps/spot.py", description=__doc__.splitlines()[0])
    p.add_argument("--study", default="spot", help="the SPoT declaration: a shipped study's name or a .toml file; "
                                                   "to resume a smoke run, its id NAME-smoke-<date>-<time>")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: the declaration's)")
    p.add_argument("--seeds", default=None, help="seeds, e.g. 0-3 (default: the declaration's)")
    p.add_argument("--spot-epochs", type=int, default=None, help="phase 2's max_epochs (default: the declaration's; "
                                                                 f"with --smoke {SMOKE_TRAIN['max_epochs']})")
    p.add_argument("--experiment", default=None, help="the MLflow experiment of both phases (default: ptray-NAME; "
                                                      "with --smoke ptray-NAME-smoke-<date>-<time>)")
    p.add_argument("--out", default="outputs/spot", help="where the two phases' declarations are written")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run both phases; returns phase 2's exit code (phase 1's when it did not finish)."""
    args, rest = build_parser().parse_known_args(argv)
    smoke, resume = "--smoke" in rest, "--resume" in rest
    try:
        files = [v for i, v in enumerate(rest) if i and rest[i - 1] == "--task-file"]
        register_task_files(files)  # the declaration and --tasks may name them
        decl, stamp = declaration_and_stamp(args.study, smoke, resume)
        ids = study_ids(decl.name, stamp)
        tasks = flags.parse_tasks(args.tasks) if args.tasks else decl.tasks
        seeds = flags.parse_seeds(args.seeds) if args.seeds else decl.seeds
        epochs = args.spot_epochs or (SMOKE_TRAIN["max_epochs"] if smoke else None)
        sources, targets = phase_texts(decl, tasks, seeds, epochs, ids)
    except PtrayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{ids[0]}.toml", out / f"{ids[1]}.toml"]
    for path, text in zip(paths, (sources, targets)):
        path.write_text(text, encoding="utf-8")
    experiment = args.experiment or f"ptray-{ids[1]}"
    common = [*rest, "--experiment", experiment]
    again = resume_command(args, rest, ids[1] if smoke else args.study)
    print(f"SPoT {'smoke run' if smoke else 'study'} {ids[1]} in MLflow experiment {experiment!r}", flush=True)
    print(f"SPoT phase 1: the source prompts, study {ids[0]} ({paths[0]})", flush=True)
    code = driver.main(["--study", str(paths[0]), *_resumable(common, ids[0], experiment), "--no-analysis"],
                       prog="python sweeps/spot.py", study=ids[0])
    if code != 0:
        if code != 2:  # 2: refused before anything started (one line said why): nothing to finish
            print(f"finish both phases with:\n  {again}", file=sys.stderr)
        return code
    print(f"\nSPoT phase 2: every target from every source and from its init text, study {ids[1]} ({paths[1]})",
          flush=True)
    code = driver.main(["--study", str(paths[1]), *_resumable(common, ids[1], experiment)],
                       analyse=analysis.run, prog="python sweeps/spot.py", study=ids[1])
    if code not in (0, 2):
        print(f"finish both phases with:\n  {again}", file=sys.stderr)
    return code


def resume_command(args: argparse.Namespace, rest: list[str], study: str) -> str:
    """The command that finishes both phases of this run: its flags, ``--resume``, and ``--study`` (a smoke run:
    its id)."""
    own = [(f"--{k.replace('_', '-')}", v) for k, v in vars(args).items()
           if k != "study" and v is not None and v != build_parser().get_default(k)]
    return shlex.join(["python", "sweeps/spot.py", "--resume", "--study", study,
                       *(str(x) for pair in own for x in pair), *(a for a in rest if a != "--resume")])


def declaration_and_stamp(study: str, smoke: bool, resume: bool) -> tuple[StudyDeclaration, str | None]:
    """The SPoT declaration ``--study`` names and the smoke stamp (``<date>-<time>``; None without ``--smoke``): a
    new one for a new smoke run; on ``--resume --smoke``, the one of the run's id ``NAME-smoke-<date>-<time>``.

    Raises:
        PtrayError: ``--resume --smoke`` without a smoke run's id; an unknown declaration.
    """
    m = re.fullmatch(r"(?P<name>.+)-smoke-(?P<stamp>\d{8}-\d{6})", study)
    if smoke and resume:
        if not m:
            raise PtrayError(f"--resume --smoke needs --study with the smoke run's id, NAME-smoke-<date>-<time> (each "
                             f"smoke run is its own pair of studies; it printed its id when it started), not {study!r}")
        return load_study(m["name"]), m["stamp"]
    if m and not smoke:
        raise PtrayError(f"--study {study!r} is a smoke run's id: pass --smoke (and --resume to finish it)")
    return load_study(study), time.strftime("%Y%m%d-%H%M%S") if smoke else None


def _resumable(argv: list[str], study: str, experiment: str) -> list[str]:
    """``argv`` without ``--resume`` when the phase's study never started (its plan is not in the experiment)."""
    if "--resume" not in argv:
        return argv
    uri = store.resolve_tracking_uri(_flag(argv, "--tracking-uri"))
    try:  # reading a missing sqlite store would create it: the driver then says there is nothing to resume
        started = store.store_exists(uri) and tracking.read_plan(store.client(uri), experiment, study) is not None
    except Exception:  # no store yet: nothing started
        started = False
    return argv if started else [a for a in argv if a != "--resume"]


def _flag(argv: list[str], name: str) -> str | None:
    return next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name), None)


if __name__ == "__main__":
    sys.exit(main())
