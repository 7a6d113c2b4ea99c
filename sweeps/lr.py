"""The lr study (sweeps/studies/lr.toml): a Ray Tune search of Adam's learning rate per task (log-uniform in
[1e-3, 1], 16 samples, seed 0), ASHA stopping the trials whose eval loss lags at epoch boundaries; the summary
reports the best lr per task. Stopped trials' runs end KILLED (tag ptray.stopped_by = asha).

    python sweeps/lr.py --smoke --data-dir ../shared/data/superglue --tasks cb --num-samples 3   # minutes on CPUs
    python sweeps/lr.py --dry-run                                  # the grid, its size, resources, outputs

Every flag of sweeps/all.py applies (``--help``); flags win over the declaration's tasks, seeds and [train]. The
study id is the declaration's name (lr; with --smoke a new lr-smoke-<date>-<time>), which --resume takes.
"""

import sys

import analysis
from ptray.study.driver import main_declared

if __name__ == "__main__":
    sys.exit(main_declared("lr", analyse=analysis.run))
