"""``python -m ptray.train``: the documented entry point of one training run, kept; the same as ``ptray train``.

The code lives in ``ptray.training.train``; this module only runs it.
"""

import sys

from ptray.training.train import main

if __name__ == "__main__":
    sys.exit(main())
