"""Argument types shared by the subcommands (not a subcommand: the leading ``_`` keeps it out of discovery)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def bounded(kind: type, low: float, high: float | None = None, open_high: bool = False,
            open_low: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite `kind` number in [low, high] (`open_low` / `open_high` leave that end out),
    else a one-line usage error naming the range."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        above = high is not None and value is not None and (value >= high if open_high else value > high)
        below = value is not None and (value <= low if open_low else value < low)
        if value is None or not math.isfinite(value) or below or above:
            what = "an integer" if kind is int else "a finite number"
            if high is None:
                limit = f"{'>' if open_low else '>='} {low}"
            elif open_low or open_high:
                limit = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
            else:
                limit = f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"expected {what} {limit}, got {text!r}")
        return value
    return parse
