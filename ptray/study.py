"""The whole study in one command: train every (task, seed) prompt with Ray Tune, evaluate every prompt on every
task (the transfer grid) as Ray tasks, track everything in MLflow, then run the analysis.

    python sweeps/all.py --smoke --data-dir ../shared/data/superglue     # minutes on 2 CPUs, tiny model
    python sweeps/all.py --address auto --storage-path s3://BUCKET/ray   # a Ray cluster (see README: Run on a cluster)

A study is named (``--study``); its plan (tasks, seeds, model, data, hyper-parameters) is stored in its MLflow
experiment when it starts, and ``--resume`` continues that plan: Tune restores unfinished trials from their last
checkpoint and every step skips what MLflow already holds as FINISHED.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ptray import tracking
from ptray.cli import OneLineParser, positive_int
from ptray.errors import PtrayError
from ptray.model import DEFAULT_MODEL
from ptray.seeds import MAX_SEED
from ptray.tasks import TASK_NAMES, get_task

SMOKE_MODEL = "tiny"  # --smoke's default model: a tiny random BLOOM built on the fly (ptray.tiny_model)
MAX_SEEDS = 1000  # seeds per study: a typo like 0-1000000 is refused, not expanded into a million trials
DEFAULT_GPUS_PER_TRIAL = 0.25  # four trials share a GPU: one bloomz-560m prompt-tuning run leaves most of it idle
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "lustre", "glusterfs", "gpfs", "beegfs",
                       "9p", "virtiofs", "efs")  # a local path on these may be shared by every node (fuse.* too)


@dataclass
class Plan:
    """What defines a study. Stored in the study's MLflow experiment; ``--resume`` continues exactly this."""

    study: str = "paper"  # the study id, tag ptray.study on every run
    tasks: tuple[str, ...] = TASK_NAMES  # SuperGLUE tasks to train (and the transfer targets)
    seeds: tuple[int, ...] = (0, 1, 2, 3)  # one trial per (task, seed)
    model: str = DEFAULT_MODEL  # Hub name, a folder present on every node, or "tiny" (built on the fly)
    data_dir: str | None = None  # official SuperGLUE jsonl folder on the driver's disk; None: the Hub
    max_epochs: int = 50  # the paper's budget
    patience: int = 5  # early stopping on eval loss
    lr: float = 3e-2  # Adam learning rate
    batch_size: int = 8  # training examples per step
    max_train_examples: int | None = None  # first N training examples (smoke runs)
    max_eval_examples: int | None = None  # first N validation examples, training and transfer (smoke runs)
    max_length: int = 512  # tokens of source + answer; longer sources are truncated
    smoke: bool = False  # the few-minute CPU version of the pipeline
    model_digest: str | None = None  # of the files of a model built on the fly
    data_digest: str | None = None  # of the data files read from data_dir

    # Fields that --resume compares with what the command line says (the digests are checked separately).
    COMPARED = ("tasks", "seeds", "model", "data_dir", "max_epochs", "patience", "lr", "batch_size",
                "max_train_examples", "max_eval_examples", "max_length", "smoke")

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tasks"], d["seeds"] = list(self.tasks), list(self.seeds)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Plan:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["tasks"], d["seeds"] = tuple(d["tasks"]), tuple(d["seeds"])
        return cls(**d)

    @property
    def trials(self) -> list[tuple[str, int]]:
        return [(t, s) for t in self.tasks for s in self.seeds]

    @property
    def num_evaluations(self) -> int:
        return len(self.trials) * len(self.tasks) + len(self.tasks)


# The tiny tokenizer spells CB and RTE premises in 200-500 tokens; 128 keeps every smoke batch short.
SMOKE_DEFAULTS = dict(model=SMOKE_MODEL, max_epochs=2, max_train_examples=32, max_eval_examples=32, max_length=128)


@dataclass
class Options:
    """How to run a study; free to change between a run and its ``--resume``."""

    experiment: str | None = None  # MLflow experiment; default "ptray-<study>"
    tracking_uri: str | None = None  # default $MLFLOW_TRACKING_URI, else ./mlflow.db
    storage_path: str | None = None  # Tune results; default ./outputs/ray_results (beside the analysis' outputs)
    address: str | None = None  # Ray cluster address ("auto"); None: $RAY_ADDRESS, else an embedded Ray
    gpus_per_trial: float | None = None  # None: 0.25 where the cluster has (or can add) GPUs, else 0
    cpus_per_trial: float = 1
    max_failures: int = 3  # retries of a failed trial (a lost node included)
    resume: bool = False
    dry_run: bool = False
    analysis: bool = True
    analysis_dir: str | None = None
    compile: bool = False  # torch.compile each transformer block in every trial and evaluation


# ---------------------------------------------------------------------------------------------------------------
# command line


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be positive, got 0")
    return value


def parse_tasks(text: str) -> tuple[str, ...]:
    """``"cb,rte"`` -> ``("cb", "rte")``; unknown or repeated names are errors."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise PtrayError(f"--tasks needs at least one task; valid tasks: {', '.join(TASK_NAMES)}")
    tasks = tuple(get_task(n).name for n in names)
    dup = sorted({t for t in tasks if tasks.count(t) > 1})
    if dup:
        raise PtrayError(f"--tasks lists {', '.join(dup)} more than once")
    return tasks


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0-3"`` -> ``(0, 1, 2, 3)``; ``"0,2,5-6"`` -> ``(0, 2, 5, 6)``. Seeds are integers >= 0, each once."""
    seeds: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise PtrayError(f"--seeds {text!r}: {part!r} is not a seed or a range like 0-3 (seeds are integers >= 0)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise PtrayError(f"--seeds {text!r}: the range {part!r} is empty")
        if hi > MAX_SEED:
            raise PtrayError(f"--seeds {text!r}: seed {hi} is out of range; seeds are integers from 0 to {MAX_SEED}")
        if len(seeds) + hi - lo + 1 > MAX_SEEDS:  # before expanding it: 0-4294967295 would not fit in memory
            raise PtrayError(f"--seeds {text!r} names {len(seeds) + hi - lo + 1} seeds, more than {MAX_SEEDS} "
                             f"trials per task; name fewer")
        seeds.extend(range(lo, hi + 1))
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise PtrayError(f"--seeds {text!r} repeats seed(s) {', '.join(map(str, dup))}")
    return tuple(seeds)


def build_parser() -> argparse.ArgumentParser:
    d, o = Plan(), Options()
    p = OneLineParser(prog="python sweeps/all.py",
                description="The whole study: Ray Tune over task x seed, the transfer grid, MLflow, the analysis.")
    g = p.add_argument_group("the study (stored when it starts; --resume continues it)")
    # Study options default to None, so that --resume can tell what the command line actually says.
    g.add_argument("--study", default=None, help="study id (default: paper; with --smoke a new smoke-<date>-<time>)")
    g.add_argument("--tasks", default=None, help=f"comma-separated tasks (default: {','.join(d.tasks)})")
    g.add_argument("--seeds", default=None, help="seeds, e.g. 0-3 or 0,2,5 (default: 0-3)")
    g.add_argument("--model", default=None, help=f"Hub name or a folder on every node (default: {d.model}; "
                                                  f"with --smoke a tiny random BLOOM built on the fly)")
    g.add_argument("--data-dir", default=None, help="SuperGLUE jsonl folder on this machine, shipped to every "
                                                    "node (default: the Hugging Face Hub)")
    g.add_argument("--max-epochs", type=positive_int, default=None, help=f"default {d.max_epochs} (smoke: 2)")
    g.add_argument("--patience", type=positive_int, default=None, help=f"early stopping (default {d.patience})")
    g.add_argument("--lr", type=_positive_float, default=None, help=f"Adam learning rate (default {d.lr})")
    g.add_argument("--batch-size", type=positive_int, default=None, help=f"default {d.batch_size}")
    g.add_argument("--max-train-examples", type=positive_int, default=None, help="default all (smoke: 32)")
    g.add_argument("--max-eval-examples", type=positive_int, default=None, help="default all (smoke: 32)")
    g.add_argument("--max-length", type=positive_int, default=None, help="max source+answer tokens (default "
                                                                          "512; smoke: 128)")
    g.add_argument("--smoke", action="store_true", default=None,
                   help="the whole pipeline in minutes on CPUs: tiny model, 2 epochs, 32 examples")
    r = p.add_argument_group("how to run it")
    r.add_argument("--experiment", default=None, help="MLflow experiment (default: ptray-<study>)")
    r.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    r.add_argument("--storage-path", default=None,
                   help="Tune results: absolute path or s3://...; shared storage on a cluster (default ./outputs/ray_results)")
    r.add_argument("--address", default=None,
                   help="Ray cluster address, e.g. auto (default: $RAY_ADDRESS, else an embedded Ray)")
    r.add_argument("--gpus-per-trial", type=_non_negative_float, default=None,
                   help=f"GPU fraction per trial/evaluation task (default {DEFAULT_GPUS_PER_TRIAL} where the cluster "
                        f"has or can add GPUs, else 0)")
    r.add_argument("--cpus-per-trial", type=_positive_float, default=o.cpus_per_trial, help=f"CPUs per trial and evaluation task (default {o.cpus_per_trial:g})")
    r.add_argument("--max-failures", type=int, default=o.max_failures, help=f"retries of a failed trial, a lost node included (default {o.max_failures})")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block in the trials (see BENCHMARKS.md)")
    r.add_argument("--resume", action="store_true", help="finish the study named by --study; rerun nothing done")
    r.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    r.add_argument("--no-analysis", dest="analysis", action="store_false", help="skip the analysis step")
    r.add_argument("--analysis-dir", default=None, help="where the analysis writes its report (default: its own)")
    return p


def plan_from_args(args: argparse.Namespace, stored: dict[str, Any] | None = None) -> Plan:
    """The study's plan: the stored one on --resume (the command line must agree with it), else from the flags."""
    given: dict[str, Any] = {}
    if args.tasks is not None:
        given["tasks"] = parse_tasks(args.tasks)
    if args.seeds is not None:
        given["seeds"] = parse_seeds(args.seeds)
    for name in ("model", "max_epochs", "patience", "lr", "batch_size", "max_train_examples", "max_eval_examples",
                 "max_length", "smoke"):
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
    if args.data_dir is not None:
        given["data_dir"] = _resolve_data_dir(args.data_dir)
    if args.study is None and args.smoke and args.resume:
        raise PtrayError("--resume --smoke needs --study: each smoke run is its own study, named smoke-<date>-<time> "
                         "(the interrupted run printed the command to resume it)")
    # Each smoke run is a new study, so that `make smoke` works again and again; the paper's study is one.
    study = args.study or (f"smoke-{time.strftime('%Y%m%d-%H%M%S')}" if args.smoke else "paper")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", study):
        raise PtrayError(f"--study {study!r}: use letters, digits, '.', '_' and '-' (it names MLflow and Tune folders)")
    if stored is not None:
        plan = Plan.from_json(stored)
        differ = [f"--{k.replace('_', '-')} (the study has {_show(getattr(plan, k))}, the command line says "
                  f"{_show(v)})" for k, v in given.items() if k in Plan.COMPARED and v != getattr(plan, k)]
        if differ:
            raise PtrayError(f"--resume continues study {study!r} as it was started, but " + "; ".join(differ)
                             + "; leave those flags out, or start a new --study")
        return plan
    fields = dict(SMOKE_DEFAULTS) if given.get("smoke") else {}
    fields.update(given)
    fields["smoke"] = bool(given.get("smoke"))
    return Plan(study=study, **fields)


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else repr(value)


def _resolve_data_dir(path: str) -> str:
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise PtrayError(f"--data-dir {path!r} does not exist; pass the folder with <TASK>/{{train,val}}.jsonl "
                         f"(e.g. ../shared/data/superglue)")
    return str(folder)


def options_from_args(args: argparse.Namespace) -> Options:
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    if args.max_failures < 0:
        raise PtrayError(f"--max-failures must be >= 0, got {args.max_failures}")
    return Options(experiment=args.experiment, tracking_uri=args.tracking_uri, storage_path=args.storage_path,
                   address=address, gpus_per_trial=args.gpus_per_trial, cpus_per_trial=args.cpus_per_trial,
                   max_failures=args.max_failures, resume=args.resume, dry_run=args.dry_run,
                   analysis=args.analysis, analysis_dir=args.analysis_dir, compile=args.compile)


def resolve_storage(path: str | None, cluster: bool) -> str:
    """Tune's storage path: a URI (s3://, gs://, ...) as is; a local path absolute. On a cluster a relative path
    is refused: it would name a different folder on every node."""
    if path is None:
        return str(Path.cwd() / "outputs" / "ray_results")
    if urlparse(path).scheme and "://" in path:
        return path.rstrip("/")
    if cluster and not Path(path).expanduser().is_absolute():
        raise PtrayError(f"--storage-path {path!r} is relative; on a cluster give shared storage: s3://BUCKET/PATH "
                         f"or an absolute path on a filesystem mounted on every node (NFS, EFS)")
    return str(Path(path).expanduser().resolve())


# ---------------------------------------------------------------------------------------------------------------
# running


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_mlflow()
    try:
        return run(args)
    except PtrayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _quiet_mlflow() -> None:
    import mlflow  # noqa: F401 - MLflow sets its loggers' level on import; set ours after it

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..." etc.


def run(args: argparse.Namespace) -> int:
    """Check everything that can be checked, then train, transfer, analyse and summarise. Returns the exit code."""
    t0 = time.perf_counter()
    opts = options_from_args(args)
    uri = tracking.resolve_tracking_uri(opts.tracking_uri)
    storage = resolve_storage(opts.storage_path, cluster=opts.address is not None)
    plan = plan_from_args(args)
    experiment = opts.experiment or f"ptray-{plan.study}"
    _data_files(plan)
    if opts.dry_run and not opts.resume:
        print(describe(plan, opts, uri, storage, experiment, new=True))
        return 0

    if opts.address:
        _check_ray_address(opts.address)
    if opts.resume and not tracking.store_exists(uri):
        raise PtrayError(f"there is no study {plan.study!r} to resume: the tracking store {uri} does not exist; "
                         f"check --tracking-uri (or MLFLOW_TRACKING_URI) and the working directory")
    tracking.check_tracking(uri)  # seconds, before anything else starts
    mc = tracking.client(uri)
    stored = tracking.read_plan(mc, experiment, plan.study)
    tune_path = _join(storage, plan.study)
    if opts.resume:
        if stored is None:
            raise PtrayError(f"there is no study {plan.study!r} to resume in MLflow experiment {experiment!r} at "
                             f"{uri}; check --study, --experiment and --tracking-uri, or start it without --resume")
        plan = plan_from_args(args, stored)
        _data_files(plan)
    else:
        if stored is not None:
            raise PtrayError(f"study {plan.study!r} already exists in MLflow experiment {experiment!r} at {uri}; "
                             f"pass --resume to finish it, or choose another --study")
        if _tune_state_exists(tune_path):
            raise PtrayError(f"{tune_path} already holds Tune results of a study {plan.study!r}; pass --resume, "
                             f"choose another --study, or another --storage-path")
    if opts.dry_run:
        print(describe(plan, opts, uri, storage, experiment, new=False))
        return 0

    from ptray.trial import quiet

    quiet()
    model_bundle, data_bundle = _bundles(plan)
    for what, digest, stored_digest in (("model", model_bundle and model_bundle.digest, plan.model_digest),
                                        ("data", data_bundle and data_bundle.digest, plan.data_digest)):
        if opts.resume and stored_digest and digest != stored_digest:
            raise PtrayError(f"the {what} files differ from those study {plan.study!r} started with "
                             f"({digest} != {stored_digest}); resume with the same files or start a new --study")
    plan.model_digest = model_bundle.digest if model_bundle else None
    plan.data_digest = data_bundle.digest if data_bundle else None

    import ray

    started_ray = _start_ray(opts.address)
    try:
        uri = _check_cluster(opts, uri, storage)
        gpus = _gpus_per_trial(opts)
        exp_id = tracking.get_or_create_experiment(mc, experiment)
        if not opts.resume:
            tracking.write_plan(mc, exp_id, plan.study, plan.to_json())
        ctx = _context(plan, exp_id, uri, model_bundle, data_bundle, compile=opts.compile)
        print(describe(plan, opts, uri, storage, experiment, new=not opts.resume, gpus=gpus), flush=True)
        outcome = train_phase(plan, opts, ctx, storage, gpus)
        if outcome["interrupted"]:
            print(f"\ninterrupted: {outcome['interrupted']} trial(s) unfinished. Finish the study with:\n  "
                  f"{_resume_command(plan, opts)}", file=sys.stderr)
            return 130
        transfer_failures = transfer_phase(plan, opts, ctx, gpus)
        summary = summarize(mc, exp_id, plan)
        complete = summary["train_done"] == len(plan.trials) and summary["eval_done"] == plan.num_evaluations
        analysis_note = analysis_phase(experiment, uri, opts, complete)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside Tune's own handling
        print(f"\ninterrupted. Finish the study with:\n  {_resume_command(plan, opts)}", file=sys.stderr)
        return 130
    finally:
        if started_ray:
            ray.shutdown()
    print(render_summary(summary, plan, experiment, exp_id, uri, tune_path, analysis_note, transfer_failures,
                         time.perf_counter() - t0))
    if not complete:
        print(f"finish the missing runs with:\n  {_resume_command(plan, opts)}", file=sys.stderr)
    return 0 if complete and not analysis_note.startswith("failed") else 1


def _join(storage: str, name: str) -> str:
    return f"{storage}/{name}" if "://" in storage else str(Path(storage) / name)


def _tune_state_exists(path: str) -> bool:
    from ray import tune

    try:
        return tune.Tuner.can_restore(path)
    except Exception:  # an unreachable bucket is reported by Tune itself when it starts
        return False


def _bundles(plan: Plan):
    """The files that travel to every node: the smoke model (built here) and the data folder's needed splits."""
    from ptray.trial import Bundle

    model_bundle = data_bundle = None
    if plan.model == SMOKE_MODEL:
        from ptray.tiny_model import build

        with tempfile.TemporaryDirectory(prefix="ptray-tiny-") as tmp:
            model_bundle = Bundle.pack(build(Path(tmp) / "model"))
    if plan.data_dir is not None:
        data_bundle = Bundle.pack(plan.data_dir, _data_files(plan))
    return model_bundle, data_bundle


def _data_files(plan: Plan) -> list[str]:
    """The files of ``plan.data_dir`` the study reads; a missing one is an error now, not in a trial."""
    if plan.data_dir is None:
        return []
    rel = [f"{get_task(t).dir_name}/{split}.jsonl" for t in plan.tasks for split in ("train", "val")]
    missing = [r for r in rel if not (Path(plan.data_dir) / r).is_file()]
    if missing:
        raise PtrayError(f"--data-dir {plan.data_dir!r} lacks {', '.join(missing)} (the official SuperGLUE "
                         f"layout <TASK>/train.jsonl, <TASK>/val.jsonl)")
    return rel


def _context(plan: Plan, exp_id: str, uri: str, model_bundle, data_bundle, compile: bool = False):
    from ptray.trial import StudyContext

    train = dict(model=plan.model, data_dir=plan.data_dir, max_epochs=plan.max_epochs, patience=plan.patience,
                 lr=plan.lr, batch_size=plan.batch_size, max_train_examples=plan.max_train_examples,
                 max_eval_examples=plan.max_eval_examples, max_length=plan.max_length, compile=compile)
    # The smoke model is logged by its path in the node-local cache, which is the same path on every node (and
    # on the driver, where the analysis loads it).
    model_label = str(model_bundle.materialize()) if model_bundle is not None else plan.model
    return StudyContext(study=plan.study, experiment_id=exp_id, tracking_uri=uri, train=train,
                        model_label=model_label, data_label=plan.data_dir, model_bundle=model_bundle,
                        data_bundle=data_bundle, params={"study": plan.study})


def _start_ray(address: str | None) -> bool:
    """Connect to the cluster at ``address``, or start an embedded Ray. Returns whether this call started it."""
    import ray

    if ray.is_initialized():
        return False
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # "local", not None: a bare init joins whatever cluster /tmp/ray names, even a dead one.
            ray.init(address="local", include_dashboard=False, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"the Ray cluster at {address!r}" if address else "an embedded Ray"
        raise PtrayError(f"could not start {where}: {str(err).splitlines()[0]}") from None
    return True


def _check_ray_address(address: str) -> None:
    """Fail in seconds when no Ray cluster answers at ``address``: ray.init retries a dead address for minutes."""
    if address.startswith("ray://"):
        return
    try:
        from ray._private.services import get_ray_address_from_environment
    except ImportError:  # moved in another Ray release: let ray.init find out
        return
    try:
        resolved = get_ray_address_from_environment(address, None)
    except ConnectionError as err:
        raise PtrayError(f"--address {address}: no running Ray cluster was found ({str(err).splitlines()[0]}); "
                         f"start one (`ray start --head`, or `ray up cluster.yaml` and run the sweep on its head)"
                         ) from None
    host, _, port = str(resolved).rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError):
        raise PtrayError(f"--address {address}: no Ray cluster answers at {resolved}; is it running? "
                         f"(`ray status` on the head tells)") from None


def _cluster_ips() -> set[str]:
    import ray

    return {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}


def _autoscaling() -> bool:
    # `ray up` starts the head with --autoscaling-config=~/ray_bootstrap_config.yaml: nodes will come and go.
    return Path("~/ray_bootstrap_config.yaml").expanduser().is_file()


def _check_cluster(opts: Options, uri: str, storage: str) -> str:
    """On a cluster of several machines: the tracking store and Tune's storage must be reachable from every node.
    Returns the tracking URI the trials should use."""
    import ray

    if opts.address is None:
        return uri
    here = ray.util.get_node_ip_address()
    several = bool(_cluster_ips() - {here}) or _autoscaling()
    if not several:
        return uri
    if tracking.is_local_store(uri):
        raise PtrayError(f"the tracking store {uri} is a file on this machine, but the Ray cluster has other "
                         f"machines; run an MLflow server (the head of cluster.yaml does) and pass --tracking-uri "
                         f"http://HEAD_PRIVATE_IP:5000")
    host = urlparse(uri).hostname
    if host in ("localhost", "127.0.0.1", "::1"):
        rewritten = uri.replace(host, here, 1)
        try:
            tracking.check_tracking(rewritten)
        except PtrayError:
            raise PtrayError(f"--tracking-uri {uri} is this machine's loopback, which other nodes cannot reach, and "
                             f"the server does not answer at {rewritten}; start it with --host 0.0.0.0 (private "
                             f"network only) and pass --tracking-uri {rewritten}") from None
        uri = rewritten
    if "://" not in storage:
        fstype = _filesystem_type(storage)
        if not (fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse")):
            raise PtrayError(f"--storage-path {storage} is on this machine's local disk ({fstype}), but the Ray "
                             f"cluster has other machines, whose trials could not write their checkpoints there; "
                             f"use s3://BUCKET/PATH or a shared filesystem mounted on every node")
    return uri


def _filesystem_type(path: str) -> str:
    """The type of the filesystem holding ``path`` (from /proc/mounts; "unknown" where there is none)."""
    target = Path(path)
    while not target.exists() and target != target.parent:
        target = target.parent
    target = target.resolve()
    best, fstype = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                mount = parts[1].replace("\\040", " ")
                if (str(target) == mount or str(target).startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                    best, fstype = mount, parts[2]
    except OSError:
        pass
    return fstype


def _gpus_per_trial(opts: Options) -> float:
    import ray

    if opts.gpus_per_trial is not None:
        return opts.gpus_per_trial
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0 or (opts.address is not None and _autoscaling())
    return DEFAULT_GPUS_PER_TRIAL if has_gpus else 0.0


def _trial_name(trial) -> str:
    return tracking.train_run_name(trial.config["task"], trial.config["seed"])


def _trial_dirname(trial) -> str:
    return f"{_trial_name(trial)}_{trial.trial_id}"


def train_phase(plan: Plan, opts: Options, ctx, storage: str, gpus: float) -> dict[str, int]:
    """One Tune trial per (task, seed). Returns counts: done, failed, interrupted (unfinished after fit)."""
    from ray import tune

    from ptray.trial import train_trial

    trainable = tune.with_resources(tune.with_parameters(train_trial, ctx=ctx),
                                    {"cpu": opts.cpus_per_trial, "gpu": gpus})
    path = _join(storage, plan.study)
    if opts.resume and _tune_state_exists(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        # Trials with the same resources reuse their worker process: imports and the model cache stay warm.
        tuner = tune.Tuner(
            trainable,
            param_space={"task": tune.grid_search(list(plan.tasks)), "seed": tune.grid_search(list(plan.seeds))},
            tune_config=tune.TuneConfig(reuse_actors=True, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=plan.study, storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=opts.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            ),
        )
    tuner.fit()
    return trial_counts(path)


def trial_counts(path: str) -> dict[str, int]:
    """Trials done, failed and left unfinished, from the experiment state Tune saved last."""
    statuses = list(trial_statuses(path).values())
    done, failed = statuses.count("TERMINATED"), statuses.count("ERROR")
    return {"done": done, "failed": failed, "interrupted": len(statuses) - done - failed}


def trial_statuses(path: str) -> dict[str, str]:
    """Each trial's status (TERMINATED, ERROR, PENDING, ...) by name, as saved in the Tune experiment at ``path``.

    Read back from storage because after a Ctrl-C Tune marks every stopped trial TERMINATED in memory, while the
    state it saved first says which ones had not finished.
    """
    from ray import tune

    quiet_logger = logging.getLogger("ray.tune")
    level = quiet_logger.level
    quiet_logger.setLevel(logging.ERROR)  # unstarted trials have no results: a warning per trial otherwise
    try:
        return {str(t): t.status for t in tune.ExperimentAnalysis(path).trials}
    finally:
        quiet_logger.setLevel(level)


def transfer_phase(plan: Plan, opts: Options, ctx, gpus: float) -> list[str]:
    """Every finished prompt on every task, plus no prompt: one Ray task per target task (the model and data load
    once per target), one MLflow run per evaluation. Returns failure messages."""
    import ray

    from ptray.trial import transfer_target

    mc = ctx.client()
    done = {(r.data.tags.get(tracking.TAG_TASK), r.data.tags.get(tracking.TAG_SEED)): r.info.run_id
            for r in tracking.search_study_runs(mc, ctx.experiment_id, ctx.study, kind="train")
            if r.info.status == tracking.FINISHED}
    sources = [{"task": t, "seed": s, "run_id": done[(t, str(s))]} for t, s in plan.trials if (t, str(s)) in done]
    print(f"\ntransfer: {len(sources)} prompts x {len(plan.tasks)} tasks + {len(plan.tasks)} no-prompt baselines, "
          f"one Ray task per target", flush=True)
    task = ray.remote(transfer_target).options(num_cpus=opts.cpus_per_trial, num_gpus=gpus, max_retries=3)
    ctx_ref = ray.put(ctx)
    pending = {task.remote(target, sources, ctx_ref): (target, time.perf_counter()) for target in plan.tasks}
    failures = []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        target, started = pending.pop(ready[0])
        try:
            runs = ray.get(ready[0])
            print(f"transfer on {target}: {len(runs)} new runs ({time.perf_counter() - started:.1f} s)", flush=True)
        except Exception as err:  # a failed target must not hide the others' results
            message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            failures.append(f"{target}: {message}")
            print(f"transfer on {target} failed: {message}", file=sys.stderr, flush=True)
    return failures


def analysis_phase(experiment: str, uri: str, opts: Options, complete: bool) -> str:
    """Run ``analysis.run`` when the analysis package exists. Returns a line for the summary."""
    if not opts.analysis:
        return "off (--no-analysis)"
    if not complete:
        return "skipped: the study is incomplete"
    try:
        import analysis
    except ImportError:
        return "skipped: the analysis package is not installed"
    if not hasattr(analysis, "run"):
        return "skipped: analysis.run does not exist yet"
    print("\nanalysis ...", flush=True)
    try:
        out = analysis.run(experiment, tracking_uri=uri, out_dir=opts.analysis_dir)
    except Exception as err:
        return f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    where = f" (report in {Path(out).resolve()})" if out else ""
    return f"done: the 'analysis' run of experiment {experiment!r}{where}"


def summarize(mc, exp_id: str, plan: Plan) -> dict[str, Any]:
    """Counts and best results, read back from MLflow (the source of truth, also after --resume)."""
    runs = tracking.search_study_runs(mc, exp_id, plan.study)
    finished = [r for r in runs if r.info.status == tracking.FINISHED]
    by_kind: dict[str, list] = {}
    for r in finished:
        by_kind.setdefault(r.data.tags.get(tracking.TAG_KIND), []).append(r)
    best: dict[str, dict[str, Any]] = {}
    for r in by_kind.get("train", []):
        m = tracking.final_metrics(r)
        task = r.data.tags.get(tracking.TAG_TASK)
        key = (m.get("exact_match", -1), m.get("rank_accuracy", -1))
        if task not in best or key > best[task]["key"]:
            best[task] = {**m, "key": key, "seed": r.data.tags.get(tracking.TAG_SEED)}
    train_names = {tracking.train_run_name(t, s) for t, s in plan.trials}
    failed = sorted(train_names - {r.info.run_name for r in by_kind.get("train", [])})
    return {
        "train_done": len(by_kind.get("train", [])),
        "train_failed": failed,
        "eval_done": len(by_kind.get("transfer", [])) + len(by_kind.get("baseline", [])),
        "best": best,
    }


def render_summary(summary, plan, experiment, exp_id, uri, tune_path, analysis_note, transfer_failures,
                   seconds) -> str:
    lines = [
        "",
        f"study {plan.study!r} in {seconds:.0f} s:",
        f"  training   {summary['train_done']}/{len(plan.trials)} trials done, {len(summary['train_failed'])} failed"
        + (f" ({', '.join(summary['train_failed'])})" if summary["train_failed"] else ""),
        f"  transfer   {summary['eval_done']}/{plan.num_evaluations} transfer and baseline runs done"
        + (f"; failed: {'; '.join(transfer_failures)}" if transfer_failures else ""),
        "  best per task (over seeds):",
    ]
    for task in plan.tasks:
        b = summary["best"].get(task)
        if b is None:
            lines.append(f"    {task:<5} no finished trial")
        else:
            lines.append(f"    {task:<5} exact match {b.get('exact_match', float('nan')):.4f}  rank accuracy "
                         f"{b.get('rank_accuracy', float('nan')):.4f}  (seed {b['seed']}, best epoch "
                         f"{int(b.get('best_epoch', 0))})")
    lines += [
        f"  MLflow     experiment {experiment!r} (id {exp_id}) at {uri}",
        f"             {tracking.ui_command(uri)}",
        f"  Tune       {tune_path}",
        f"  analysis   {analysis_note}",
    ]
    return "\n".join(lines)


def _resume_command(plan: Plan, opts: Options) -> str:
    parts = ["python sweeps/all.py", "--resume", f"--study {plan.study}"]
    if opts.experiment:
        parts.append(f"--experiment {opts.experiment}")
    if opts.tracking_uri:
        parts.append(f"--tracking-uri {opts.tracking_uri}")
    if opts.storage_path:
        parts.append(f"--storage-path {opts.storage_path}")
    if opts.address:
        parts.append(f"--address {opts.address}")
    return " ".join(parts)


def describe(plan: Plan, opts: Options, uri: str, storage: str, experiment: str, new: bool,
             gpus: float | None = None) -> str:
    """The plan in a few lines: trials, resources, where results go."""
    if gpus is None:
        gpus_text = (f"{opts.gpus_per_trial:g} GPU" if opts.gpus_per_trial is not None else
                     f"{DEFAULT_GPUS_PER_TRIAL:g} GPU if the cluster has GPUs, else none")
    else:
        gpus_text = f"{gpus:g} GPU"
    model = ("a tiny random BLOOM built on the fly" if plan.model == SMOKE_MODEL else plan.model)
    subset = ""
    if plan.max_train_examples or plan.max_eval_examples:
        subset = (f", first {plan.max_train_examples or 'all'} train / {plan.max_eval_examples or 'all'} eval "
                  f"examples")
    names = [tracking.train_run_name(t, s) for t, s in plan.trials]
    ray_text = f"the cluster at {opts.address}" if opts.address else "embedded (started by this script)"
    return "\n".join([
        f"study {plan.study!r} ({'new' if new else 'resume'}{', smoke' if plan.smoke else ''})",
        f"  ray        {ray_text}",
        f"  model      {model}",
        f"  data       {plan.data_dir or 'the Hugging Face Hub (aps/super_glue)'}",
        f"  training   {len(plan.trials)} trials ({', '.join(plan.tasks)} x seeds "
        f"{', '.join(map(str, plan.seeds))}), each {opts.cpus_per_trial:g} CPU + {gpus_text}; up to "
        f"{plan.max_epochs} epochs (patience {plan.patience}), lr {plan.lr:g}, batch {plan.batch_size}, "
        f"max length {plan.max_length}{subset}; "
        f"{opts.max_failures} retries",
        f"             {' '.join(names)}",
        f"  transfer   {plan.num_evaluations} evaluations ({len(plan.trials)} prompts x {len(plan.tasks)} tasks + "
        f"{len(plan.tasks)} no-prompt baselines), one Ray task per target task, same resources",
        f"  MLflow     experiment {experiment!r} at {uri}",
        f"  Tune       {_join(storage, plan.study)} (checkpoint every epoch)",
        f"  analysis   {'python -m analysis --experiment ' + experiment if opts.analysis else 'off'}",
    ])
