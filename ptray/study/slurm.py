"""``ptray slurm``: the study as a SLURM batch job, following Ray's documented SLURM recipe.

    ptray slurm --nodes 2 --gpus-per-node 1 --time 12:00:00 -- --study paper --data-dir ~/data/superglue --submit

writes ``slurm/<study>/job.sbatch`` (``--job-dir``) and, with ``--submit``, hands it to ``sbatch``. The job starts
Ray's head on its first node and a worker on each other node with ``srun`` (the node list from SLURM, the head's
address handed to the workers), each with the allocation's CPUs (and ``--gpus-per-node`` GPUs), then runs
``ptray study ... --address HEAD`` against that cluster. The tracking store is ``--tracking-uri`` when given, else
an MLflow server the job starts on its head node over ``<job dir>/mlflow.db``; Tune's results go to
``<job dir>/ray_results`` unless ``--storage-path`` says otherwise. Ray's and MLflow's temporary files go to the
job's scratch space (``$TMPDIR``, else /tmp, in a folder named after the job).

Time limits and preemption: the job asks SLURM for ``USR1`` ``--signal-lead`` seconds before its time limit
(``--signal=B:USR1@S``); the script then interrupts the driver as Ctrl-C would (trials stop at their last
checkpoint, Tune saves its state) and requeues the job (``scontrol requeue``). Every run of the script, requeued
or resubmitted with ``sbatch slurm/<study>/job.sbatch``, resumes the study when its tracking store holds it
(``--resume``): nothing finished runs again, and a trial continues from its last epoch's checkpoint.

Everything that can be checked on the login node is checked before anything is written or submitted, each a
``PtrayError`` line: sbatch on PATH, the partition, its nodes, CPUs and GPUs (``sinfo``), the study's flags, and a
tracking URI every node can reach.

The script's text is ``ptray.study.sbatch``; it calls this module for two small steps of the job (``python -m
ptray.study.slurm started|wait ...``).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from ptray.cli import OneLineParser, non_negative_int, positive_int
from ptray.errors import PtrayError
from ptray.study import store
from ptray.study.flags import build_parser as study_parser
from ptray.study.flags import plan_from_args, study_declaration, study_id
from ptray.study.sbatch import SCRIPT_NAME, render, write_script

# Flags the job sets itself: where Ray runs, and whether the study starts or resumes (it asks the store).
JOB_FLAGS = {"address": "--address", "local": "--local", "resume": "--resume", "dry_run": "--dry-run"}
LOOPBACK = ("localhost", "127.0.0.1", "::1")


def build_parser(prog: str = "ptray slurm") -> argparse.ArgumentParser:
    """``ptray slurm``'s own flags; every other flag (or all after ``--``) is the study's (``ptray study --help``)."""
    p = OneLineParser(prog=prog, allow_abbrev=False, description=(
        "Write (and with --submit, submit) a SLURM batch job that runs the study on a Ray cluster across its nodes. "
        "Flags not listed here are ptray study's."))
    p.add_argument("--nodes", type=positive_int, default=1, help="nodes of the job: Ray's head on the first, a "
                   "worker on each other (default 1)")
    p.add_argument("--cpus-per-node", type=positive_int, default=None,
                   help="CPUs per node for Ray (unset: whole nodes, --exclusive)")
    p.add_argument("--gpus-per-node", type=non_negative_int, default=0, help="GPUs per node (default 0)")
    p.add_argument("--partition", default=None, help="SLURM partition (unset: the cluster's default)")
    p.add_argument("--time", default=None, help="time limit, as sbatch --time takes it (e.g. 12:00:00)")
    p.add_argument("--signal-lead", type=positive_int, default=300, help="seconds before the time limit at which "
                   "the study is stopped at its trials' checkpoints and the job requeued (default 300)")
    p.add_argument("--job-dir", default=None, help="the job's script, logs, MLflow store and (unset "
                   "--storage-path) Tune results, on a filesystem every node mounts (default: slurm/<study>)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="another #SBATCH option, e.g. --sbatch=--account=lab (repeatable)")
    p.add_argument("--ray-port", type=positive_int, default=6379, help="the Ray head's port (default 6379)")
    p.add_argument("--mlflow-port", type=positive_int, default=5000,
                   help="the port of the MLflow server on the head node, without --tracking-uri (default 5000)")
    p.add_argument("--submit", action="store_true", help="submit the script with sbatch (else: print how)")
    return p


@dataclass
class Partition:
    """What ``sinfo`` says of a partition: its nodes, and the most CPUs and GPUs one of them has."""

    name: str
    nodes: int = 0
    cpus: int = 0
    gpus: int = 0
    default: bool = False
    groups: list[str] = field(default_factory=list)


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise PtrayError(f"{cmd[0]} failed: {err}") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise PtrayError(f"{' '.join(cmd[:2])} failed: {last}")
    return out.stdout


def gres_gpus(gres: str) -> int:
    """GPUs in a node's GRES as sinfo prints it (``gpu:a100:4(S:0-1),shard:8`` -> 4; ``(null)`` -> 0)."""
    return sum(int(n) for n in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))


def partitions() -> dict[str, Partition]:
    """The cluster's partitions from ``sinfo`` (one line per group of alike nodes).

    Raises:
        PtrayError: sinfo is missing or fails (no controller answers).
    """
    if shutil.which("sinfo") is None:
        raise PtrayError("sinfo is not on PATH: run ptray slurm on a login node of the SLURM cluster")
    parts: dict[str, Partition] = {}
    for line in _run(["sinfo", "--noheader", "--format=%P|%D|%c|%G"]).splitlines():
        name, nodes, cpus, gres = (line.split("|") + ["", "", ""])[:4]
        default = name.endswith("*")
        part = parts.setdefault(name.rstrip("*"), Partition(name.rstrip("*")))
        part.default |= default
        part.nodes += int(nodes or 0)
        part.cpus = max(part.cpus, int(re.match(r"\d*", cpus).group() or 0))  # "2" or "2+"
        part.gpus = max(part.gpus, gres_gpus(gres))
    return parts


def check_cluster(partition: str | None, nodes: int, cpus: int | None, gpus: int) -> str | None:
    """Refuse a partition, node count, CPUs or GPUs per node that the cluster (``sinfo``) does not have. Returns
    the partition the job goes to (None: the cluster's default, when it names none).

    Raises:
        PtrayError: one line naming what the cluster has.
    """
    parts = partitions()
    if partition is not None and partition not in parts:
        raise PtrayError(f"--partition {partition}: the cluster has no such partition (it has: "
                         f"{', '.join(sorted(parts)) or 'none'})")
    name = partition or next((p.name for p in parts.values() if p.default), None)
    if name is None:
        return None  # no default partition: sbatch says what it wants
    part = parts[name]
    if nodes > part.nodes:
        raise PtrayError(f"--nodes {nodes}: partition {name} has {part.nodes} node(s)")
    if cpus is not None and cpus > part.cpus:
        raise PtrayError(f"--cpus-per-node {cpus}: no node of partition {name} has more than {part.cpus} CPUs")
    if gpus > part.gpus:
        has = f"has at most {part.gpus} GPU(s) per node" if part.gpus else "has no GPUs"
        raise PtrayError(f"--gpus-per-node {gpus}: partition {name} {has} (sinfo's GRES)")
    return partition


def check_tracking_uri(uri: str | None, nodes: int) -> None:
    """A tracking URI the job's nodes can reach: not a relative path (which folder it names depends on where a
    process runs), and with several nodes neither a file on one machine nor its loopback address.

    Raises:
        PtrayError: one line saying what to pass instead.
    """
    if not uri:
        return
    scheme = urlparse(uri).scheme
    if scheme in ("sqlite", "file", ""):
        path = store.local_path(uri) if scheme else Path(uri)
        if path is not None and not path.expanduser().is_absolute():
            raise PtrayError(f"--tracking-uri {uri} is a relative path, which names another folder wherever a job "
                             f"runs; give an absolute path on a shared filesystem, or leave it out (the job starts "
                             f"an MLflow server on its head node)")
        if nodes > 1:
            raise PtrayError(f"--tracking-uri {uri} is a file, which the job's {nodes} nodes cannot share; leave it "
                             f"out (the job starts an MLflow server on its head node) or pass an MLflow server")
    elif nodes > 1 and urlparse(uri).hostname in LOOPBACK:
        raise PtrayError(f"--tracking-uri {uri} is the loopback address, which the job's other nodes cannot reach; "
                         f"pass the server's address on the cluster's network, or leave it out (the job starts an "
                         f"MLflow server on its head node)")


def study_flags(rest: list[str]) -> tuple[list[str], str, str, argparse.Namespace]:
    """The study's flags as the job passes them (``--study`` fixed, so that a resubmitted job resumes the same
    study), its study id, its experiment, and the parsed flags. The plan they describe is built (and so checked)
    here, before anything is written.

    Raises:
        PtrayError: a bad study flag, a flag the job sets itself, or a declared study with ``--smoke``.
        SystemExit: a flag ``ptray study`` does not know (one line, status 2, as ``ptray study``).
    """
    rest = rest[1:] if rest[:1] == ["--"] else rest
    args = study_parser("ptray slurm ... --").parse_args(rest)
    for key, flag in JOB_FLAGS.items():
        if getattr(args, key, None):
            raise PtrayError(f"{flag}: the job sets it (--address: the job's Ray head; --resume: whenever the "
                             f"tracking store holds the study); leave it out")
    decl = study_declaration(args.study)
    if decl is not None and args.smoke:
        raise PtrayError(f"--smoke with the declared study {args.study!r} names a new study on every run, which a "
                         f"requeued job could not resume; run it on SLURM without --smoke, or locally")
    sid = study_id(args, decl)
    plan_from_args(args)  # tasks, seeds, data folder, model, declaration: refused now, not on the node
    flags = list(rest)
    if args.study is None:  # the default id (a smoke study's is stamped now): fixed in the script
        flags = ["--study", sid, *flags]
    return flags, sid, args.experiment or f"ptray-{sid}", args


def main(argv: list[str] | None = None, prog: str = "ptray slurm") -> int:
    """``ptray slurm``: check, write the job script, submit it with ``--submit``. Returns the exit status (2 with
    one ``error:`` line for bad input, before anything is written or submitted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        own, rest = argv[:argv.index("--")], argv[argv.index("--") + 1:]
        args = build_parser(prog).parse_args(own)
    else:
        args, rest = build_parser(prog).parse_known_args(argv)
    try:
        if shutil.which("sbatch") is None:
            raise PtrayError("sbatch is not on PATH: run ptray slurm on a login node of the SLURM cluster (or load "
                             "its module first)")
        flags, sid, experiment, study_args = study_flags(rest)
        uri = study_args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        check_tracking_uri(uri, args.nodes)
        if uri and store.is_local_store(uri):
            uri = store.resolve_tracking_uri(uri)
        storage = study_args.storage_path
        if storage is not None and "://" not in storage and not Path(storage).expanduser().is_absolute():
            raise PtrayError(f"--storage-path {storage} is relative; give an absolute path on a filesystem every "
                             f"node mounts, or s3://BUCKET/PATH (unset: the job folder's ray_results)")
        partition = check_cluster(args.partition, args.nodes, args.cpus_per_node, args.gpus_per_node)
        job_dir = Path(args.job_dir or Path("slurm") / sid).expanduser().resolve()
        script = job_dir / SCRIPT_NAME
        text = render(flags=flags,
                      study=sid, experiment=experiment, job_dir=job_dir, workdir=Path.cwd(),
                      python=sys.executable, nodes=args.nodes, cpus=args.cpus_per_node, gpus=args.gpus_per_node,
                      partition=partition, time_limit=args.time, signal_lead=args.signal_lead, extra=args.sbatch,
                      ray_port=args.ray_port, mlflow_port=args.mlflow_port, tracking_uri=uri, storage_path=storage)
        write_script(script, text)
    except PtrayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {script}")
    if not args.submit:
        print(f"submit it (and resubmit it after a time limit or a cancel: it resumes the study) with:\n  "
              f"sbatch {shlex.quote(str(script))}")
        return 0
    out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"error: sbatch refused the job: {(out.stderr.strip().splitlines() or ['no output'])[-1]}",
              file=sys.stderr)
        return 1
    job = out.stdout.strip().split(";")[0]
    print(f"submitted job {job}; its output: {job_dir}/slurm-{job}.out; resubmit with: sbatch {script}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# the job's own steps: python -m ptray.study.slurm started URI EXPERIMENT STUDY | wait ray|mlflow ADDRESS N SECONDS


def started(uri: str, experiment: str, study: str) -> bool:
    """Whether the tracking store holds the study's plan: the job resumes it rather than starting it."""
    from ptray.study import tracking

    return tracking.read_plan(store.open_store(uri), experiment, study) is not None


def wait_for(what: str, address: str, count: int, seconds: float) -> None:
    """Wait until ``count`` Ray nodes are alive at ``address`` (``what`` = ray), or the MLflow server at
    ``address`` answers (``what`` = mlflow).

    Raises:
        PtrayError: not within ``seconds``.
    """
    import socket

    deadline = time.monotonic() + seconds
    while True:
        try:
            if what == "mlflow":
                store.check_tracking(address)
                return
            host, _, port = address.rpartition(":")
            # ray.init retries an address where nothing listens for minutes: connect first
            socket.create_connection((host, int(port)), timeout=5).close()
            import ray

            if not ray.is_initialized():
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            alive = sum(1 for n in ray.nodes() if n.get("Alive"))
            if alive >= count:
                ray.shutdown()
                return
            last = f"{alive} of {count} Ray node(s) up"
        except (PtrayError, OSError, RuntimeError) as err:  # ConnectionError is an OSError
            last = str(err).splitlines()[0] if str(err) else type(err).__name__
        if time.monotonic() > deadline:
            raise PtrayError(f"{what} at {address} not ready in {seconds:g} s: {last}")
        time.sleep(2)


def job_step(argv: list[str]) -> int:
    """The job script's steps; returns the exit status (``started``: 0 when the study is stored, 1 when not)."""
    try:
        if argv[:1] == ["started"] and len(argv) == 4:
            return 0 if started(*argv[1:]) else 1
        if argv[:1] == ["wait"] and len(argv) == 5:
            wait_for(argv[1], argv[2], int(argv[3]), float(argv[4]))
            return 0
    except PtrayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("usage: python -m ptray.study.slurm started URI EXPERIMENT STUDY | wait ray|mlflow ADDRESS N SECONDS",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(job_step(sys.argv[1:]))
