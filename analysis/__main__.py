"""python -m analysis --experiment NAME [--tracking-uri URI] [--out DIR]: the study's report, logged to MLflow."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from analysis.results import AnalysisOptions
from ptray.cli import OneLineParser, add_config_arguments, config_from_args
from ptray.errors import PtrayError


def build_parser(prog: str = "python -m analysis") -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True, help="the study's MLflow experiment name")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's default / "
                                                        "$MLFLOW_TRACKING_URI)")
    p.add_argument("--out", default=None, help="report folder (default outputs/analysis/<experiment>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.add_argument("--model", default=None, help="model to analyse against (default: the train runs' model)")
    add_config_arguments(p, AnalysisOptions)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the model runs")
    p.add_argument("--no-log", action="store_true", help="write the folder only; log no analysis run")
    p.add_argument("--log-only", action="store_true", help="compute nothing: log the report already in --out as "
                                                           "the analysis run (after its logging failed)")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m analysis") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from analysis import run

    try:
        options = config_from_args(AnalysisOptions, args)
        out = run(args.experiment, tracking_uri=args.tracking_uri, out_dir=args.out, model=args.model,
                  device=args.device, overwrite=args.overwrite, log_to_mlflow=not args.no_log,
                  log_only=args.log_only, **dataclasses.asdict(options))
    except PtrayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"logged the report {out}/report.html to MLflow" if args.log_only else
          f"wrote the report to {out}/report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
