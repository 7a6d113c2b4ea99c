"""python -m analysis --experiment NAME [--tracking-uri URI] [--out DIR]: the study's report, logged to MLflow."""

from __future__ import annotations

import argparse
import logging
import sys

from ptray.cli import OneLineParser, positive_int, seed_int
from ptray.errors import PtrayError


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m analysis", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True, help="the study's MLflow experiment name")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's default / "
                                                        "$MLFLOW_TRACKING_URI)")
    p.add_argument("--out", default=None, help="report folder (default outputs/analysis/<experiment>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.add_argument("--model", default=None, help="model to analyse against (default: the train runs' model)")
    p.add_argument("--data-dir", default=None, help="SuperGLUE jsonl folder for the faithfulness check "
                                                    "(default: the train runs' data_dir)")
    p.add_argument("--top-k", type=positive_int, default=3, help="nearest tokens per prompt row (default 3)")
    p.add_argument("--distance", default="truncate", choices=["truncate", "pad"],
                   help="distance between prompts of different lengths: over the common length (truncate, "
                        "default) or with zero rows padded (pad)")
    p.add_argument("--bootstrap", type=positive_int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed for t-SNE and the bootstrap (0 to 2**32 - 1)")
    p.add_argument("--no-faithfulness", action="store_true",
                   help="skip evaluating the discretised prompts (the slow part on CPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the model runs")
    p.add_argument("--no-log", action="store_true", help="write the folder only; log no analysis run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from analysis import run

    try:
        out = run(args.experiment, tracking_uri=args.tracking_uri, out_dir=args.out, model=args.model,
                  data_dir=args.data_dir, top_k=args.top_k, distance=args.distance, n_boot=args.bootstrap,
                  seed=args.seed, faithfulness=not args.no_faithfulness, device=args.device,
                  overwrite=args.overwrite, log_to_mlflow=not args.no_log)
    except PtrayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote the report to {out}/report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
