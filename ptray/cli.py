"""Shared command-line pieces: one-line argument errors (exit 2) and positive-number argument types."""

from __future__ import annotations

import argparse
import math

from ptray.seeds import MAX_SEED


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (``error: ...``) and exits 2, like every ptray error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def seed_int(text: str) -> int:
    """argparse type: a seed, an integer from 0 to ``ptray.seeds.MAX_SEED`` (else ``ArgumentTypeError``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be a seed from 0 to {MAX_SEED} (2**32 - 1), got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value
