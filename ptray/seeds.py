"""Seeds: the range every ptray command accepts, and the seeds derived from the user's, which stay in range.

A seed from the user seeds Python, NumPy (which takes 0 to 2**32 - 1), torch and scikit-learn, so it must lie in
the range all of them accept; derived seeds (one per epoch) must fit torch's 64 bits for any such seed.
"""

from __future__ import annotations

from ptray.errors import PtrayError

MAX_SEED = 2**32 - 1  # NumPy's and scikit-learn's largest seed; torch takes up to 2**64 - 1


def check_seed(seed, what: str = "seed") -> int:
    """Return ``seed`` if it is an integer in [0, MAX_SEED]; else raise PtrayError naming ``what`` and the range."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise PtrayError(f"{what} must be an integer from 0 to {MAX_SEED} (2**32 - 1), got {seed!r}")
    return seed


def epoch_seed(seed: int, epoch: int) -> int:
    """The data-order seed of ``epoch`` in a run seeded with ``seed``: ``seed * 100_003 + epoch`` (the formula
    runs so far used), wrapped into torch's range [0, 2**64) so that no seed and epoch can overflow it."""
    return (seed * 100_003 + epoch) % 2**64


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (``seed`` in [0, MAX_SEED], ``check_seed``)."""
    import random

    import numpy as np
    import torch  # here, not at the top: the configs import this module and must not load torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
