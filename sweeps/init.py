"""The init study (sweeps/studies/init.toml): how the prompt starts (the task's init text, random rows, random
vocabulary rows, the answer words), each a condition of tasks x seeds.

    python sweeps/init.py --smoke --data-dir ../shared/data/superglue --tasks cb --seeds 0   # minutes on CPUs
    python sweeps/init.py --dry-run                                  # the grid, its size, resources, outputs

Every flag of sweeps/all.py applies (``--help``); flags win over the declaration's tasks, seeds and [train]. The
study id is the declaration's name (init; with --smoke a new init-smoke-<date>-<time>), which --resume takes.
"""

import sys

import analysis
from ptray.study.driver import main_declared

if __name__ == "__main__":
    sys.exit(main_declared("init", analyse=analysis.run))
