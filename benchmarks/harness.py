"""What every benchmark shares: the best of several repeats, and the machine's load at the start.

This machine is shared, so a single timing says more about the neighbours than about the code:
tables report the best of at least `REPEATS` runs, and the 1-minute load average when the
benchmark started.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

R = TypeVar("R")
REPEATS = 3


def load_average() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def header(title: str, repeats: int = REPEATS) -> str:
    """The benchmark's first line: what it measures, and the load when it began."""
    best = f"best of >= {repeats} repeats" if repeats > 1 else "one run"
    return (
        f"{title}\n1-minute load average at start: {load_average():.2f} "
        f"({os.cpu_count()} cores); {best}"
    )


def best_of(fn: Callable[[], R], key: Callable[[R], float], repeats: int = REPEATS) -> R:
    """The result of `repeats` runs of fn with the smallest `key` (seconds; or -rate)."""
    if repeats < REPEATS:
        raise ValueError(f"repeats must be >= {REPEATS}, got {repeats}")
    return min((fn() for _ in range(repeats)), key=key)
