"""The whole study in one command: Ray Tune over task x seed, the transfer grid, MLflow tracking, the analysis.

    python sweeps/all.py --smoke --data-dir ../shared/data/superglue   # end to end in minutes on 2 CPUs
    python sweeps/all.py --dry-run                                     # the plan: trials, resources, outputs
    python sweeps/all.py --address auto --storage-path s3://BUCKET/ray --data-dir ~/data/superglue   # a cluster

The study itself lives in ``ptray.study`` (plan, Tuner, transfer tasks, summary), the trial adapters in
``ptray.trial``, the MLflow layout in ``ptray.tracking`` and docs/tracking.md.
"""

import sys

from ptray.study import main

if __name__ == "__main__":
    sys.exit(main())
