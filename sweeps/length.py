"""The length study (sweeps/studies/length.toml): prompts of 1, 5, 10, 20, 50 and 100 tokens of the task's init
text (truncated or cycled), each a condition of tasks x seeds.

    python sweeps/length.py --smoke --data-dir ../shared/data/superglue --tasks cb --seeds 0   # minutes on CPUs
    python sweeps/length.py --dry-run                                  # the grid, its size, resources, outputs

Every flag of sweeps/all.py applies (``--help``); flags win over the declaration's tasks, seeds and [train]. The
study id is the declaration's name (length; with --smoke a new length-smoke-<date>-<time>), which --resume takes.
"""

import sys

import analysis
from ptray.study.driver import main_declared

if __name__ == "__main__":
    sys.exit(main_declared("length", analyse=analysis.run))
