"""`--keep` rules of SPEC §5: parsing, and what one fraction or threshold rule keeps.

Fraction rules keep exactly floor(f·N) rows with ties to the smaller uid (`--ties exact`, the
default), or follow DataComp's baselines (`--ties datacomp`): threshold at index int(N·f) of
the descending sort, every row at or above it kept. `column==TEXT` keeps the rows whose string
column equals TEXT; `datacomp:NAME` is one of DataComp's named baselines (`curate.datacomp_rules`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from mmcurate.errors import UsageError

NORMSIM_D = "normsim_d"
EQUALS = "=="
NAMED = "named"
DATACOMP_PREFIX = "datacomp:"
DATACOMP_NAMES = ("basic", "text_based", "laion2b", "image_based")
EXACT = "exact"
DATACOMP = "datacomp"
TIES = (EXACT, DATACOMP)
_OPS = (">=", "<=", ">", "<")
_COMPARE = {
    ">=": np.greater_equal,
    "<=": np.less_equal,
    ">": np.greater,
    "<": np.less,
}
# Column names as `score` writes them (normsim_2.5, normsim_1e-05) and DataComp's.
_METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.+-]*$")
PairsAt = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Rule:
    """One --keep stage: `metric:FRACTION` (op ":"), `metric OP X` (a threshold), `column==TEXT`
    (op "==", the text in `string`) or `datacomp:NAME` (op "named", metric the whole name)."""

    text: str
    metric: str
    op: str
    value: float
    fraction: Fraction | None = None
    string: str | None = None

    @property
    def is_fraction(self) -> bool:
        """True for top-fraction rules (including normsim_d)."""
        return self.op == ":"


def parse_rule(text: str) -> Rule:
    """Parse one --keep rule; anything malformed or a fraction outside (0, 1] is a UsageError."""
    rule = text.strip()
    if rule.startswith(DATACOMP_PREFIX):
        return _named(text, rule)
    if EQUALS in rule:
        column, _, value = (s.strip() for s in rule.partition(EQUALS))
        if not _METRIC_NAME.match(column) or column == "uid" or not value:
            raise UsageError(f"bad --keep rule {text!r}: use column==TEXT, e.g. lang==en")
        return Rule(rule, column, EQUALS, math.nan, string=value)
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


def _named(text: str, rule: str) -> Rule:
    name = rule[len(DATACOMP_PREFIX) :]
    if name == "image_based_intersect_clip_score":
        raise UsageError(
            "datacomp:image_based_intersect_clip_score is two rules: --keep "
            "clip_l14_similarity_score:0.3 --ties datacomp --keep datacomp:image_based"
        )
    if name not in DATACOMP_NAMES:
        names = ", ".join(DATACOMP_PREFIX + n for n in DATACOMP_NAMES)
        raise UsageError(f"unknown DataComp baseline {text!r}: use {names}")
    return Rule(rule, rule, NAMED, math.nan)


def keep_count(fraction: Fraction, pool_size: int) -> int:
    """floor(fraction · N), exact for decimal fractions (0.29 · 100 is 29, not 28)."""
    return math.floor(fraction * pool_size)


def datacomp_index(fraction: float, pool_size: int) -> int:
    """DataComp's cut-off index `int(N * f)`, in float arithmetic as its baselines compute it."""
    return int(pool_size * fraction)


def _exact_cut(
    column: np.ndarray, alive: np.ndarray, values: np.ndarray, k: int, pairs_at: PairsAt
) -> tuple[np.ndarray, float | None]:
    """The k best scored rows of `alive` (ties to the smaller uid) and the lowest kept score.

    `values` is `column[alive]`, reordered here; NaN sorts last, so `partition` finds the
    k-th largest among the scored values. Uids are read only when rows tie at the cut-off.
    """
    scored = len(values) - int(np.count_nonzero(np.isnan(values)))
    if k <= 0:
        return np.zeros_like(alive), None
    if k >= scored:
        keep = ~np.isnan(column)
        keep &= alive
        return keep, float(np.nanmin(values)) if scored else None
    values.partition(scored - k)
    kth = values[scored - k]
    keep = column > kth
    keep &= alive
    need = k - int(np.count_nonzero(keep))
    tied = column == kth
    tied &= alive
    rows = np.flatnonzero(tied)
    del tied
    if len(rows) > need:
        pairs = pairs_at(rows)
        rows = rows[np.lexsort((pairs["f1"], pairs["f0"]))[:need]]
    keep[rows] = True
    return keep, float(kth)


def _datacomp_cut(
    column: np.ndarray, alive: np.ndarray, values: np.ndarray, index: int
) -> tuple[np.ndarray, float | None]:
    """DataComp's rule: the threshold is the score at `index` of the descending sort (NaN
    last), and every row scoring at least that is kept, ties included.

    When the index falls past the scored rows, DataComp's code takes a NaN threshold (or
    fails at f = 1); here every scored row is kept instead, and the threshold is None.
    """
    scored = len(values) - int(np.count_nonzero(np.isnan(values)))
    if index >= scored:
        keep = ~np.isnan(column)
        keep &= alive
        return keep, None
    values.partition(scored - 1 - index)
    threshold = values[scored - 1 - index]
    keep = column >= threshold
    keep &= alive
    return keep, float(threshold)


def apply_rule(
    rule: Rule,
    column: np.ndarray,
    alive: np.ndarray,
    pool_size: int,
    pairs_at: PairsAt,
    ties: str = EXACT,
) -> tuple[np.ndarray, dict]:
    """The rows (a mask) that a fraction or threshold rule keeps of `alive`, NaN never, and
    its record. `pairs_at(rows)` gives the uids of ascending row positions."""
    values = column[alive]
    record: dict[str, Any] = {
        "rule": rule.text,
        "metric": rule.metric,
        "input": int(len(values)),
        "nan": int(np.count_nonzero(np.isnan(values))),
    }
    if not rule.is_fraction:
        del values
        with np.errstate(over="ignore"):
            bound = column.dtype.type(rule.value)
        keep = _COMPARE[rule.op](column, bound)
        keep &= alive
        record.update(kind="threshold", op=rule.op, threshold=rule.value)
    elif ties == DATACOMP:
        index = datacomp_index(rule.value, pool_size)
        keep, cutoff = _datacomp_cut(column, alive, values, index)
        record.update(
            kind="fraction", ties=DATACOMP, fraction=rule.value, index=index, threshold=cutoff
        )
    else:
        target = keep_count(rule.fraction, pool_size)
        keep, cutoff = _exact_cut(column, alive, values, target, pairs_at)
        record.update(kind="fraction", fraction=rule.value, target=target, threshold=cutoff)
    record["count"] = int(np.count_nonzero(keep))
    return keep, record
