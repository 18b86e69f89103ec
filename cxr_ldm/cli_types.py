"""argparse `type=` functions shared by the command lines (sample.py, `python -m cxr_ldm.evaluate`): a bad
value becomes argparse's one-line `error:` with exit status 2, before any work."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def number(low: float, high: float = math.inf, note: str = "") -> Callable[[str], float]:
    """A finite float in [low, high]; `note` is added to the error."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low <= value <= high):
            bounds = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"expected a number {bounds}{note}, got {text!r}")
        return value
    return parse


def strength(text: str) -> float:
    """An editing strength in (0, 1] (1 = from noise)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value
