"""``python -m ptray``: the ``ptray`` command (``ptray.command``)."""

import sys

from ptray.command import main

sys.exit(main())
