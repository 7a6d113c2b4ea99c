"""The whole study in one command: Ray Tune over task x seed, the transfer grid, MLflow tracking, the analysis.

    python sweeps/all.py --smoke --data-dir ../shared/data/superglue   # end to end in minutes on 2 CPUs
    python sweeps/all.py --dry-run                                     # the plan: trials, resources, outputs
    python sweeps/all.py --address auto --storage-path s3://BUCKET/ray --data-dir ~/data/superglue   # a cluster

This script composes the two halves: the study (``ptray.study``: plan, Tuner, transfer tasks, summary) and then
the analysis of what it tracked (``analysis.run``); the library never imports the analysis itself.
docs/architecture.md shows how the pieces fit.
"""

import sys

import analysis
from ptray.study.driver import main

if __name__ == "__main__":
    sys.exit(main(analyse=analysis.run))
