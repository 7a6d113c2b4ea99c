"""The paper's study (sweeps/studies/paper.toml): one prompt per task and seed, each task's init text, Adam, up to
50 epochs with patience 5; the same plan as sweeps/all.py's default, declared.

    python sweeps/paper.py --smoke --data-dir ../shared/data/superglue --tasks cb --seeds 0   # minutes on CPUs
    python sweeps/paper.py --dry-run                                  # the grid, its size, resources, outputs

Every flag of sweeps/all.py applies (``--help``); flags win over the declaration's tasks, seeds and [train]. The
study id is the declaration's name (paper; with --smoke a new paper-smoke-<date>-<time>), which --resume takes.
"""

import sys

import analysis
from ptray.study.driver import main_declared

if __name__ == "__main__":
    sys.exit(main_declared("paper", analyse=analysis.run))
