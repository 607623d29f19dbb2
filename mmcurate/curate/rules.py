"""`--keep` rules of SPEC §5: parsing, and what one fraction or threshold rule keeps."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from mmcurate.errors import UsageError

NORMSIM_D = "normsim_d"
_OPS = (">=", "<=", ">", "<")
_COMPARE = {
    ">=": np.greater_equal,
    "<=": np.less_equal,
    ">": np.greater,
    "<": np.less,
}
_METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Rule:
    """One --keep stage: `metric:FRACTION` (op ":") or `metric OP X` (a threshold)."""

    text: str
    metric: str
    op: str
    value: float
    fraction: Fraction | None = None

    @property
    def is_fraction(self) -> bool:
        """True for top-fraction rules (including normsim_d)."""
        return self.op == ":"


def parse_rule(text: str) -> Rule:
    """Parse one --keep rule; anything malformed or a fraction outside (0, 1] is a UsageError."""
    rule = text.strip()
    for op in (*_OPS, ":"):
        if op in rule:
            metric, _, raw = (s.strip() for s in rule.partition(op))
            break
    else:
        raise UsageError(
            f"bad --keep rule {text!r}: use metric:FRACTION or metric>=X (also <=, >, <)"
        )
    if not _METRIC_NAME.match(metric) or metric == "uid":
        raise UsageError(f"bad --keep rule {text!r}: {metric!r} is not a metric name")
    if op == ":":
        try:
            frac = Fraction(raw)
        except (ValueError, ZeroDivisionError):
            raise UsageError(f"bad --keep rule {text!r}: {raw!r} is not a number") from None
        if not 0 < frac <= 1:
            raise UsageError(f"fraction {raw} outside (0, 1] in --keep {text}")
        return Rule(rule, metric, op, float(frac), frac)
    if metric == NORMSIM_D:
        raise UsageError(f"bad --keep rule {text!r}: normsim_d takes a fraction (normsim_d:0.2)")
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"bad --keep rule {text!r}: {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise UsageError(f"bad --keep rule {text!r}: the threshold must be finite")
    return Rule(rule, metric, op, value)


def keep_count(fraction: Fraction, pool_size: int) -> int:
    """floor(fraction · N), exact for decimal fractions (0.29 · 100 is 29, not 28)."""
    return math.floor(fraction * pool_size)


def top_k(
    scores: np.ndarray, pairs: np.ndarray, k: int, rows: np.ndarray | None = None
) -> np.ndarray:
    """Positions (ascending) of the k best scores; at equal score the smaller uid wins.

    The uid of position i is `pairs[rows[i]]` (or `pairs[i]` without rows); only the uids at
    the cut-off score are looked at, so the pool's uids are never copied.
    """
    n = len(scores)
    if k >= n:
        return np.arange(n)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    kth = np.partition(scores, n - k)[n - k]
    above = np.flatnonzero(scores > kth)
    ties = np.flatnonzero(scores == kth)
    tied = pairs[ties if rows is None else rows[ties]]
    order = np.lexsort((tied["f1"], tied["f0"]))
    return np.sort(np.concatenate([above, ties[order[: k - len(above)]]]))


def apply_rule(
    rule: Rule, column: np.ndarray, pairs: np.ndarray, rows: np.ndarray, pool_size: int
) -> tuple[np.ndarray, dict]:
    """The rows (ascending) that a fraction or threshold rule keeps, NaN never, and its record."""
    values = column[rows]
    nan = np.isnan(values)
    n_nan = int(nan.sum())
    record: dict[str, Any] = {
        "rule": rule.text,
        "metric": rule.metric,
        "input": int(len(rows)),
        "nan": n_nan,
    }
    if rule.is_fraction:
        if n_nan:
            rows, values = rows[~nan], values[~nan]
        target = keep_count(rule.fraction, pool_size)
        pos = top_k(values, pairs, target, rows)
        cutoff = float(values[pos].min()) if len(pos) else None
        keep = rows[pos]
        record.update(kind="fraction", fraction=rule.value, target=target, threshold=cutoff)
    else:
        with np.errstate(over="ignore"):
            bound = np.float32(rule.value)
        keep = rows[_COMPARE[rule.op](values, bound)]
        record.update(kind="threshold", op=rule.op, threshold=rule.value)
    record["count"] = int(len(keep))
    return keep, record
