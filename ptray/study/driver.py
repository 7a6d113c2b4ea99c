"""The whole study in one command: train every (task, seed) prompt with Ray Tune, evaluate every prompt on every
task (the transfer grid) as Ray tasks, track everything in MLflow, then hand the study to the analysis.

    python sweeps/all.py --smoke --data-dir ../shared/data/superglue     # minutes on 2 CPUs, tiny model
    python sweeps/all.py --address auto --storage-path s3://BUCKET/ray   # a Ray cluster (see README: Run on a cluster)

A study is named (``--study``); its plan (tasks, seeds, model, data, the training config) is stored in its MLflow
experiment when it starts, and ``--resume`` continues that plan: Tune restores unfinished trials from their last
checkpoint and every step skips what MLflow already holds as FINISHED.

This module is the orchestration only: the configs are in ``ptray.config`` and ``ptray.plan``, the flags and
the plan they describe in ``ptray.study.flags``, the checks in ``ptray.study.preflight`` and
``ptray.study.cluster``, the trials in ``ptray.study.trial`` and the Tuner in ``ptray.study.tuner``, the transfer
grid in ``ptray.study.transfer``, what is printed in ``ptray.study.summary``. ptray never imports the analysis: the
entry script (``sweeps/all.py``) passes it in.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ptray.config import DEFAULT_GPU_GROUP_SIZE
from ptray.errors import PtrayError
from ptray.files import EXPERIMENT_MAX, check_name, disk_full_from, is_disk_full
from ptray.plan import Options, Plan
from ptray.study import cluster, fingerprint, preflight, store, tracking
from ptray.study.bundle import Bundle, tiny_model_bundle
from ptray.study.context import StudyContext, quiet
from ptray.study.flags import build_parser, options_from_args, plan_from_args
from ptray.study.lease import StudyLease
from ptray.study.paths import tune_path
from ptray.study.summary import describe, describe_left, describe_local, render_summary, resume_command, summarize
from ptray.study.transfer import transfer_phase
from ptray.study.tuner import train_phase, tune_state_exists

# analyse(experiment, tracking_uri=..., out_dir=...) -> the report folder: ``analysis.run``'s signature.
Analyse = Callable[..., Any]


def main(argv: list[str] | None = None, analyse: Analyse | None = None, prog: str = "python sweeps/all.py",
         study: str | None = None) -> int:
    """Run the study the flags describe; returns the exit code (2 with one line on bad input).

    ``analyse``: the analysis step (``analysis.run``), passed in by the entry script. ``study``: the study id, for
    a script that names its studies itself (``sweeps/spot.py``: a smoke run's two phases share one stamp, and the
    second names the first's runs), instead of the one ``--study`` and ``--smoke`` give.
    """
    args = build_parser(prog).parse_args(argv)
    _quiet_mlflow()
    try:
        return run(args, analyse, study=study)
    except PtrayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk where no writer of ours said which folder (MLflow's artifact copy, ...)
        if not is_disk_full(err):
            raise
        print(f"error: {disk_full_from(err)}", file=sys.stderr)
        return 2


def run_local_study(plan: Plan, opts: Options, experiment: str, analyse: Analyse | None) -> int:
    """``--local DIR``: the study in this process (``ptray.study.local``), then published into MLflow when MLflow
    is installed and the store answers, then analysed. Returns the exit code (130 when interrupted)."""
    from ptray.study.local import folder_lock, prepare

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # a line per finished epoch
    study_dir = str(Path(opts.local).expanduser().resolve())
    if plan.search:  # before anything is written
        raise PtrayError("a search needs Ray Tune's scheduler: run this study without --local")
    prepare(plan, study_dir, opts.resume)  # the folder and its plan, or the stored plan checked
    with folder_lock(study_dir):  # held to the end: training, publishing and the analysis
        return _run_local_study(plan, opts, experiment, analyse, study_dir)


def _run_local_study(plan: Plan, opts: Options, experiment: str, analyse: Analyse | None, study_dir: str) -> int:
    from ptray.study.local import run_local

    resume = f"ptray study --resume --local {study_dir}"
    try:
        # one process on one device: torch's own thread count (every core) unless --threads asks for a trial's;
        # the folder is prepared (above): this continues it
        counts = run_local(plan, study_dir, resume=True, threads=opts.threads, compile=opts.compile)
    except KeyboardInterrupt:
        print(f"\ninterrupted. Finish the study with:\n  {resume}", file=sys.stderr)
        return 130
    print(f"local study {plan.study}: {counts['train']} train runs and {counts['evaluations']} evaluations written "
          f"to {study_dir}")
    publish_later = f"ptray publish {study_dir} --experiment {experiment}"
    try:
        from ptray.study.publish import publish

        out = publish(study_dir, opts.tracking_uri, experiment)
    except ImportError:  # a GPU machine with torch only: the folder goes home and is published there
        print(f"MLflow is not installed here: publish it where it is with\n  {publish_later}")
        return 0
    except PtrayError as err:
        print(f"not published ({err}); publish it later with\n  {publish_later}", file=sys.stderr)
        return 1
    print(f"published {out['published']} runs into MLflow experiment {experiment!r} at {out['tracking_uri']} "
          f"(artifacts in {out['artifacts']})")
    note = analysis_phase(experiment, out["tracking_uri"], opts, True, analyse)
    print(f"analysis: {note}")
    return 0 if not note.startswith("failed") else 1


def local_plan_json(study_dir: str) -> dict:
    """The stored plan of a local study folder (``--resume --local DIR``), as ``plan_from_args`` takes it."""
    from ptray.study.local import read_plan

    return read_plan(study_dir).to_json()


def main_declared(name: str, argv: list[str] | None = None, analyse: Analyse | None = None,
                  prog: str | None = None) -> int:
    """``main`` for the shipped declaration ``name`` (``sweeps/NAME.py``): ``--study NAME`` unless ``argv`` names a
    study itself (``--resume --study NAME-smoke-<date>-<time>``, another declaration)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--study" or a.startswith("--study=") for a in argv):
        argv = ["--study", name, *argv]
    return main(argv, analyse=analyse, prog=prog or f"python sweeps/{name}.py")


def _quiet_mlflow() -> None:
    try:
        import mlflow  # noqa: F401 - MLflow sets its loggers' level on import; set ours after it
    except ImportError:  # a local study runs without MLflow (a GPU machine with torch only)
        return

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..." etc.


def run(args: argparse.Namespace, analyse: Analyse | None = None, study: str | None = None) -> int:
    """Check everything that can be checked, then train, transfer, analyse (``analyse``, when given) and summarise.
    ``study``: the study id, when the caller chose it (``main``).

    Returns the exit code: 0 when every run and the analysis finished, 1 when some did not, 130 when interrupted.
    Raises ``PtrayError`` (one line) for anything the user must change, before anything has started.
    """
    t0 = time.perf_counter()
    opts = options_from_args(args)
    uri = store.resolve_tracking_uri(opts.tracking_uri)
    storage = preflight.resolve_storage(opts.storage_path, cluster=opts.address is not None)
    plan = plan_from_args(args, study=study)
    if plan.num_samples is not None and not plan.search:  # here: plan_from_args takes every flag it is given
        raise PtrayError("--num-samples: the study declares no search; it trains each (task, seed) once")
    experiment = opts.experiment or f"ptray-{plan.study}"
    if opts.local is not None:  # one process, one device, run folders: no Ray, MLflow only to publish
        if opts.resume:
            plan = plan_from_args(args, local_plan_json(opts.local), study=study)
            experiment = opts.experiment or f"ptray-{plan.study}"  # the stored study's, not the flags' default
        check_experiment_name(experiment, opts)
        preflight.check_data(plan)
        if opts.dry_run:
            if not opts.resume:  # what the real run refuses: a folder a study was started in
                from ptray.study.local import check_new_folder

                check_new_folder(opts.local)
            print(describe_local(plan, opts, str(Path(opts.local).expanduser().resolve()), uri, experiment,
                                 new=not opts.resume))
            return 0
        return run_local_study(plan, opts, experiment, analyse)
    check_experiment_name(experiment, opts)
    if not opts.resume:  # a resumed study's files are checked against its stored plan, once read (below)
        preflight.check_data(plan)
    tune_folder = tune_path(storage, plan.study)
    # A dry run makes the real run's checks of the store and Tune's folder (it refuses what the run would refuse,
    # in the same words), but creates nothing: with no store yet, only Tune's folder can hold the study.
    if opts.dry_run and not opts.resume and not store.store_exists(uri):
        _check_new(plan, None, tune_folder, experiment, uri)
        print(describe(plan, opts, uri, storage, experiment, new=True))
        return 0

    if opts.address and not opts.dry_run:
        cluster.check_ray_address(opts.address)
    if opts.resume and not store.store_exists(uri):
        raise PtrayError(f"there is no study {plan.study!r} to resume: the tracking store {uri} does not exist; "
                         f"check --tracking-uri (or MLFLOW_TRACKING_URI) and the working directory")
    mc = store.open_store(uri)  # seconds, before anything else starts; a store MLflow refuses is one line
    tracking.check_experiment(mc, experiment, uri, plan.study)  # deleted: how to restore or purge it
    stored = tracking.read_plan(mc, experiment, plan.study)
    if opts.resume:
        if stored is None:
            raise PtrayError(f"there is no study {plan.study!r} to resume in MLflow experiment {experiment!r} at "
                             f"{uri}; check --study, --experiment and --tracking-uri, or start it without --resume")
        plan = plan_from_args(args, stored, study=study)
        preflight.check_data(plan)
    else:
        _check_new(plan, stored, tune_folder, experiment, uri)
    if opts.dry_run:
        print(describe(plan, opts, uri, storage, experiment, new=not opts.resume))
        if opts.resume:
            print(describe_left(summarize(mc, tracking.get_or_create_experiment(mc, experiment), plan), plan))
        return 0

    quiet()
    model_bundle, data_bundle = _bundles(plan)
    # the model: the smoke model's bundle, a local folder's files, a Hub name's cached revision (--resume: the same)
    model_digest, model_files = ((model_bundle.digest, None) if model_bundle else
                                 fingerprint.model_fingerprint(plan.train.model))
    if opts.resume:
        fingerprint.check_same_model(plan, model_digest, model_files)
    data_digest, data_files = (data_bundle.digest, data_bundle.file_digests()) if data_bundle else (None, None)
    # accepted new data files (--accept-new-data) are stored with the plan, so that a later --resume compares them
    new_data = opts.resume and fingerprint.check_same_data(plan, data_digest, data_files, opts.accept_new_data)
    plan.model_digest, plan.model_files = model_digest, model_files
    plan.data_digest, plan.data_files = data_digest, data_files
    preflight.check_plan_lengths(plan, str(model_bundle.materialize()) if model_bundle else plan.train.model)

    import ray

    exp_id = tracking.get_or_create_experiment(mc, experiment)
    # One driver per study, in the store itself (another machine's driver included): a second one is refused here,
    # before it starts anything (or kills the running one's Ray below).
    lease = StudyLease(mc, exp_id, plan.study).acquire()
    started_ray, watch = False, store.ServerWatch(uri)  # says once when a tracking server stops answering, and after
    try:
        if not opts.resume and tracking.read_plan(mc, experiment, plan.study) is not None:  # started meanwhile
            raise PtrayError(f"study {plan.study!r} already exists in MLflow experiment {experiment!r} at {uri}; "
                             f"pass --resume to finish it, or choose another --study")
        if opts.resume and not opts.address:  # a killed driver's embedded Ray leaves its agents running
            cluster.clear_leftover_ray()
        started_ray = cluster.start_ray(opts.address)
        watch.__enter__()
        uri = cluster.check_cluster(opts, uri, storage)
        gpus = cluster.gpus_per_trial(opts)
        # stored resolved: --resume keeps it; a searched trial is a group of one (its scheduler stops trials)
        plan.group_size = 1 if plan.search else resolve_group_size(plan.group_size, gpus)
        trial_gpus = group_gpus(gpus, plan.group_size, opts)
        cluster.check_cluster_resources(opts, trial_gpus, gpus)  # a request no node can hold would wait forever
        if not opts.resume or new_data:
            tracking.write_plan(mc, exp_id, plan.study, plan.to_json())
        ctx = study_context(plan, exp_id, uri, model_bundle, data_bundle, compile=opts.compile,
                            threads=opts.torch_threads)
        print(describe(plan, opts, uri, storage, experiment, new=not opts.resume, gpus=trial_gpus), flush=True)
        outcome = train_phase(plan, opts, ctx, storage, trial_gpus)
        if outcome["interrupted"]:
            print(f"\ninterrupted: {outcome['interrupted']} trial(s) unfinished. Finish the study with:\n  "
                  f"{resume_command(plan, opts)}", file=sys.stderr)
            return 130
        transfer_failures = transfer_phase(plan, opts, ctx, gpus)
        summary = summarize(mc, exp_id, plan)
        complete = summary["complete"]
        analysis_note = analysis_phase(experiment, uri, opts, complete, analyse)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside Tune's own handling
        print(f"\ninterrupted. Finish the study with:\n  {resume_command(plan, opts)}", file=sys.stderr)
        return 130
    finally:
        watch.__exit__(None, None, None)
        if started_ray:
            ray.shutdown()
        lease.release()
    print(render_summary(summary, plan, experiment, exp_id, uri, tune_folder, analysis_note, transfer_failures,
                         time.perf_counter() - t0, artifacts=tracking.artifact_location(mc, exp_id)))
    if not complete:
        print(f"finish the missing runs with:\n  {resume_command(plan, opts)}", file=sys.stderr)
    return 0 if complete and not analysis_note.startswith("failed") else 1


def check_experiment_name(experiment: str, opts: Options) -> None:
    """Refuse, before anything starts, an experiment name that would become the analysis's report folder (no
    ``--analysis-dir``) and is no folder name (``ptray.files.check_name``: ``a/b``, ``../x``, ``/abs``, ``é``)."""
    if opts.analysis and opts.analysis_dir is None:
        check_name(experiment, "--experiment", "the analysis writes its report into a folder of that name under "
                   "outputs/analysis; or pass --analysis-dir DIR", max_length=EXPERIMENT_MAX)


def _check_new(plan: Plan, stored: dict | None, tune_folder: str, experiment: str, uri: str) -> None:
    """Refuse to start study ``plan.study`` anew where MLflow (``stored``: its stored plan) or Tune's folder
    already holds it; the real run and its dry run say the same line.

    Raises:
        PtrayError: the study exists (pass --resume, or choose another --study).
    """
    if stored is not None:
        raise PtrayError(f"study {plan.study!r} already exists in MLflow experiment {experiment!r} at {uri}; "
                         f"pass --resume to finish it, or choose another --study")
    if tune_state_exists(tune_folder):
        raise PtrayError(f"{tune_folder} already holds Tune results of a study {plan.study!r}; pass --resume, "
                         f"choose another --study, or another --storage-path")


def resolve_group_size(group_size: int | None, gpus: float) -> int:
    """``--group-size`` as given, else 1 on CPUs and ``DEFAULT_GPU_GROUP_SIZE`` when trials get GPUs (``gpus``, the
    per-prompt GPU fraction, above 0)."""
    if group_size is not None:
        return group_size
    return DEFAULT_GPU_GROUP_SIZE if gpus > 0 else 1


def group_gpus(gpus: float, group_size: int, opts: Options) -> float:
    """The GPU fraction of one Tune trial of ``group_size`` prompts: ``--gpus-per-trial`` as given, else the
    per-prompt default times the group's prompts, at most one GPU (a group runs in one process, on one GPU)."""
    if opts.gpus_per_trial is not None:
        return opts.gpus_per_trial
    return min(1.0, gpus * group_size)


def _bundles(plan: Plan) -> tuple[Bundle | None, Bundle | None]:
    """The files that travel to every node: the smoke model (built here) and the data folder's needed splits."""
    model_bundle = tiny_model_bundle() if plan.tiny_model else None
    data_bundle = None
    if plan.train.data_dir is not None:
        data_bundle = Bundle.pack(plan.train.data_dir, preflight.data_files(plan))
    return model_bundle, data_bundle


def study_context(plan: Plan, exp_id: str, uri: str, model_bundle: Bundle | None, data_bundle: Bundle | None,
                  compile: bool = False, threads: int = 0) -> StudyContext:
    """What every trial and evaluation of the study shares (``--compile`` and ``threads``, torch's CPU threads in
    each, are run options, not part of the plan)."""
    # The smoke model is logged by its path in the node-local cache, which is the same path on every node (and
    # on the driver, where the analysis loads it).
    model_label = str(model_bundle.materialize()) if model_bundle is not None else plan.train.model
    return StudyContext(study=plan.study, experiment_id=exp_id, tracking_uri=uri,
                        train=dataclasses.replace(plan.train, compile=compile), model_label=model_label,
                        data_label=plan.train.data_dir, model_bundle=model_bundle, data_bundle=data_bundle,
                        task_declarations=plan.task_declarations, threads=threads,
                        params={"study": plan.study,  # the model's digest: what the runs were computed on
                                **({"model_digest": plan.model_digest} if plan.model_digest else {})})


def analysis_phase(experiment: str, uri: str, opts: Options, complete: bool, analyse: Analyse | None) -> str:
    """Run ``analyse`` on the finished study (the entry script passes ``analysis.run``). Returns a summary line."""
    if not opts.analysis:
        return "off (--no-analysis)"
    if analyse is None:
        return f"not run here: python -m analysis --experiment {experiment}"
    if not complete:
        return "skipped: the study is incomplete"
    print("\nanalysis ...", flush=True)
    try:
        out = analyse(experiment, tracking_uri=uri, out_dir=opts.analysis_dir)
    except Exception as err:
        return f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    where = f" (report in {Path(out).resolve()})" if out else ""
    return f"done: the 'analysis' run of experiment {experiment!r}{where}"
