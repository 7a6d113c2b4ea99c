"""analysis: the paper's figures and tables from a study tracked in MLflow, and the measurements it missed.

    python -m analysis --experiment NAME [--tracking-uri URI] [--out DIR]

``run`` reads the study's runs (docs/tracking.md), loads the model the prompts were trained on, computes every
analysis (``analysis.pipeline.compute``), writes the report folder and logs it as the experiment's ``analysis`` run.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ptray.errors import PtrayError

log = logging.getLogger("ptray.analysis")

__all__ = ["DEFAULT_OUT", "run"]

DEFAULT_OUT = Path("outputs") / "analysis"


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a folder that holds anything but an earlier report (which a re-run replaces), unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise PtrayError(f"output path {str(out)!r} exists and is not a folder; choose another --out")
    earlier_report = (out / "analysis.json").is_file() and (out / "report.html").is_file()
    if out.is_dir() and any(out.iterdir()) and not (overwrite or earlier_report):
        raise PtrayError(f"output folder {str(out)!r} already holds files; choose a new --out or pass --overwrite")


def run(experiment: str, tracking_uri: str | None = None, out_dir: str | os.PathLike | None = None,
        model: str | None = None, device: str = "auto", overwrite: bool = False, log_to_mlflow: bool = True,
        **options) -> Path:
    """Analyse ``experiment``; returns the report folder (default ``outputs/analysis/<experiment>``; an earlier
    report there is replaced).

    ``model`` overrides the train runs' ``config.json`` model; ``options`` are fields of
    ``analysis.results.Options`` (``n_boot=200``, ``faithfulness=False``, ``data_dir=...``, ...). Raises
    PtrayError for an option out of range or a store, experiment, model or output folder that is not usable;
    nothing is written then (TypeError for an unknown option). The folder is written whole (a temp sibling
    renamed into place), then logged to MLflow.
    """
    import torch

    from analysis import mlflow_io, report
    from analysis.pipeline import Options, compute
    from ptray.lm.load import load_model, resolve_device_precision

    try:
        options = Options(**options)
    except ValueError as err:
        raise PtrayError(str(err)) from None
    out = Path(out_dir) if out_dir is not None else DEFAULT_OUT / experiment
    _prepare_out(out, overwrite)
    study, notes = mlflow_io.load_study(experiment, tracking_uri)
    log.info("experiment %s: %d train runs, %d transfer/baseline runs", experiment, len(study.prompts),
             len(study.evals))
    models = sorted({str(p.config.get("model")) for p in study.prompts if p.config.get("model")})
    if model is None:
        if len(models) != 1:
            raise PtrayError(f"the train runs name {len(models)} models ({', '.join(models) or 'none'}); pass "
                             f"--model with the one to analyse against")
        model = models[0]
    dev, _ = resolve_device_precision(device, "no")
    lm, tokenizer = load_model(model, dtype=torch.float32)
    lm.to(dev)
    results = compute(study, lm, tokenizer, options, notes)
    results.meta["model"] = model

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        report.write_all(results, tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if log_to_mlflow:
        run_id = mlflow_io.log_analysis(study, out, tracking_uri, results.metrics)
        log.info("logged the report as run %s of experiment %s", run_id, experiment)
    return out
