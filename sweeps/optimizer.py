"""The optimizer study (sweeps/studies/optimizer.toml): Adam, AdamW, Adafactor and SGD with momentum, each at its
default lr, each a condition of tasks x seeds.

    python sweeps/optimizer.py --smoke --data-dir ../shared/data/superglue --tasks cb --seeds 0   # minutes on CPUs
    python sweeps/optimizer.py --dry-run                                  # the grid, its size, resources, outputs

Every flag of sweeps/all.py applies (``--help``); flags win over the declaration's tasks, seeds and [train]. The
study id is the declaration's name (optimizer; with --smoke a new optimizer-smoke-<date>-<time>), which --resume takes.
"""

import sys

import analysis
from ptray.study.driver import main_declared

if __name__ == "__main__":
    sys.exit(main_declared("optimizer", analyse=analysis.run))
