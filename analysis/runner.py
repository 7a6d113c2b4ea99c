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

__all__ = ["DEFAULT_OUT", "check_out", "default_out", "earlier_report", "run"]

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
        **options) -> Path:
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
        **options: fields of ``analysis.results.AnalysisOptions`` (``n_boot=200``, ``faithfulness=False``, ...).

    Every input that changes a number (the options, the model, its dtype and device, the code and library
    versions) is recorded in ``analysis.json`` under ``meta.inputs``, and each step's wall time (seconds) under
    ``meta.seconds``.

    Raises:
        PtrayError: an option out of range, or a store, experiment, model or output folder that is not usable;
            nothing is written then.
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
    out = check_out(Path(out_dir) if out_dir is not None else default_out(experiment), overwrite)
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
        run_id = mlflow_io.log_analysis(study, out, tracking_uri, results.metrics)
        log.info("logged the report as run %s of experiment %s", run_id, experiment)
    return out
