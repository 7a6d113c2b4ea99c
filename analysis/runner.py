"""``run``: one analysis from the MLflow experiment to the report folder, and the folder's handling.

The folder is checked before anything is computed (``check_out``: ``ptray.files.check_output_folder``, an earlier
report accepted), written whole through ``ptray.files.atomic_folder`` (a temporary sibling renamed into place, so
a failure never leaves half a report), then logged to MLflow as the experiment's ``analysis`` run.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ptray.errors import PtrayError

log = logging.getLogger("ptray.analysis")

__all__ = ["DEFAULT_OUT", "check_out", "default_out", "earlier_report", "log_report", "run"]

DEFAULT_OUT = Path("outputs") / "analysis"


def earlier_report(folder: Path) -> bool:
    """Whether ``folder`` holds an earlier analysis report (``analysis.json`` and ``report.html``), which a re-run
    replaces."""
    return (folder / "analysis.json").is_file() and (folder / "report.html").is_file()


def default_out(experiment: str) -> Path:
    """The report folder of ``experiment`` when no ``--out`` is given: ``outputs/analysis/<experiment>``.

    Raises:
        PtrayError: ``experiment`` is no folder name (``ptray.files.check_name``: ``a/b`` would nest folders, ``../x``
            or an absolute name would put the report outside ``outputs/analysis``).
    """
    from ptray.files import EXPERIMENT_MAX, check_name

    why = f"it names the report folder {DEFAULT_OUT}/<experiment>; or pass --out DIR"
    return DEFAULT_OUT / check_name(experiment, "--experiment", why, max_length=EXPERIMENT_MAX)


def check_out(out: Path, overwrite: bool) -> Path:
    """Refuse, before any work, an ``out`` that could not be written at the end or that holds anything but an
    earlier report, unless ``overwrite`` (``ptray.files.check_output_folder``); returns it as a Path.

    Raises:
        PtrayError: one line naming the folder and what to do.
    """
    from ptray.files import check_output_folder

    return check_output_folder(out, "--out", overwrite, holds="files", reusable=earlier_report)


def run(experiment: str, tracking_uri: str | None = None, out_dir: str | os.PathLike | None = None,
        model: str | None = None, device: str = "auto", overwrite: bool = False, log_to_mlflow: bool = True,
        log_only: bool = False, **options) -> Path:
    """Analyse ``experiment``; returns the report folder (default ``outputs/analysis/<experiment>``; an earlier
    report there is replaced).

    Args:
        experiment: the study's MLflow experiment name.
        tracking_uri: the MLflow store (None: MLflow's default / ``$MLFLOW_TRACKING_URI``).
        out_dir: the report folder.
        model: overrides the train runs' ``config.json`` model (a Hub name or a local folder).
        device: ``auto``, ``cpu`` or ``cuda``: where the model runs (fp32 either way).
        overwrite: replace a folder that holds other files.
        log_to_mlflow: log the folder as the experiment's ``analysis`` run.
        log_only: compute nothing: log the report already in the folder (one whose logging failed).
        **options: fields of ``analysis.results.AnalysisOptions`` (``n_boot=200``, ``faithfulness=False``, ...).

    Every input that changes a number (the options, the model, its dtype and device, the code and library
    versions) is recorded in ``analysis.json`` under ``meta.inputs``, and each step's wall time (seconds) under
    ``meta.seconds``.

    Raises:
        PtrayError: an option out of range, or a store, experiment, model or output folder that is not usable;
            nothing is written then. A store that fails once the report is written: the line says so, where the
            report is, and the command that logs it later (``log_only``).
        TypeError: an unknown option.
    """
    import torch

    from analysis import mlflow_io, report
    from analysis.pipeline import AnalysisOptions, compute
    from ptray.files import atomic_folder
    from ptray.lm.load import load_model, resolve_device_precision

    try:
        options = AnalysisOptions(**options)
    except ValueError as err:
        raise PtrayError(str(err)) from None
    out = Path(out_dir) if out_dir is not None else default_out(experiment)
    if log_only:
        return log_report(experiment, tracking_uri, out)
    out = check_out(out, overwrite)
    seconds = {}
    t0 = time.perf_counter()
    study, notes = mlflow_io.load_study(experiment, tracking_uri)
    seconds["load_study"] = round(time.perf_counter() - t0, 3)
    log.info("experiment %s: %d train runs, %d transfer/baseline runs", experiment, len(study.prompts),
             len(study.evals))
    models = sorted({str(p.config.get("model")) for p in study.prompts if p.config.get("model")})
    model_source = "--model" if model is not None else "the train runs' config.json"
    if model is None:
        if len(models) != 1:
            raise PtrayError(f"the train runs name {len(models)} models ({', '.join(models) or 'none'}); pass "
                             f"--model with the one to analyse against")
        model = models[0]
    dev, _ = resolve_device_precision(device, "no")
    t0 = time.perf_counter()
    lm, tokenizer = load_model(model, dtype=torch.float32)
    lm.to(dev)
    seconds["load_model"] = round(time.perf_counter() - t0, 3)
    results = compute(study, lm, tokenizer, options, notes)
    coverage = results.summary.get("coverage")
    if coverage and not coverage["complete"]:  # said where the user looks, not only in the report
        log.warning("warning: %s; the report's first section names the missing runs", coverage["headline"])
    results.meta["model"] = model
    results.meta["inputs"]["model"].update(name=model, source=model_source, trained_on=models, device=str(dev))
    results.meta["seconds"] = {**seconds, **results.meta["seconds"]}
    t0 = time.perf_counter()
    with atomic_folder(out) as tmp:  # replaces an earlier report only once the new one is whole
        report.write_all(results, tmp)
    log.info("wrote the report in %.1f s", time.perf_counter() - t0)
    if log_to_mlflow:
        _log(experiment, study.experiment_id, study.study, out, tracking_uri, results.metrics)
    return out


def log_report(experiment: str, tracking_uri: str | None, out: Path) -> Path:
    """Log the report already in ``out`` (written by an earlier ``run`` whose logging failed) as ``experiment``'s
    ``analysis`` run, with the metrics its ``analysis.json`` keeps; computes nothing. Returns ``out``.

    Raises:
        PtrayError: ``out`` holds no report, or the store cannot be reached or used.
    """
    import json

    from analysis import mlflow_io

    if not earlier_report(out):
        raise PtrayError(f"{out} holds no report (analysis.json and report.html) to log; run ptray analyse without "
                         f"--log-only to write one")
    summary = json.loads((out / "analysis.json").read_text())
    client, _ = mlflow_io.connect(tracking_uri)
    exp = mlflow_io.find_experiment(client, experiment)
    study_name = (summary.get("meta") or {}).get("study") or experiment
    _log(experiment, exp.experiment_id, study_name, out, tracking_uri, summary.get("mlflow_metrics") or {})
    return out


def _log(experiment: str, experiment_id: str, study_name: str, out: Path, tracking_uri: str | None,
         metrics: dict[str, float]) -> None:
    """``mlflow_io.log_analysis``; a store that fails (a server stopped mid-analysis) is one line saying that the
    report was written, where, and how to log it later."""
    import shlex

    from analysis import mlflow_io
    from ptray.study import store

    uri = store.resolve_tracking_uri(tracking_uri)
    try:
        run_id = mlflow_io.log_analysis(experiment_id, study_name, out, tracking_uri, metrics)
    except Exception as err:  # noqa: BLE001 - PtrayError lines, MLflow's and its HTTP client's errors alike
        reason = err if isinstance(err, PtrayError) else store.store_error(uri, err)
        again = shlex.join(["ptray", "analyse", "--experiment", experiment, "--tracking-uri", uri, "--out", str(out),
                            "--log-only"])
        raise PtrayError(f"{reason} -- the report was written to {out / 'report.html'} but not logged to MLflow; "
                         f"to log it once the store answers (computing nothing again): {again}") from None
    log.info("logged the report as run %s of experiment %s", run_id, experiment)
