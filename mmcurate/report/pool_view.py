"""What the report reads from a scored pool: one score column at a time, which rows a subset
holds (uids read file by file), the selection replayed stage by stage, column statistics and
example rows. Peak memory is one column, a few row masks and one file's table."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmcurate.curate.pool import Pool
from mmcurate.curate.rules import EXACT, NORMSIM_D, apply_rule, parse_rule
from mmcurate.errors import UsageError

QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
LOW_KEPT = ("<=", "<")


def score_columns(path) -> list[str]:
    """The floating-point columns of a score file (uid aside), in file order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:
        raise UsageError(f"unreadable score file {path}: {exc}") from None
    return [f.name for f in schema if f.name != "uid" and pa.types.is_floating(f.type)]


def _contains(subset: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Which pairs a sorted unique subset holds (searchsorted on the high half, then the low)."""
    hi, lo = subset["f0"], subset["f1"]
    left = np.searchsorted(hi, pairs["f0"], "left")
    right = np.searchsorted(hi, pairs["f0"], "right")
    found = (right - left == 1) & (lo[np.minimum(left, len(hi) - 1)] == pairs["f1"])
    for j in np.flatnonzero(right - left > 1):
        run = lo[left[j] : right[j]]
        k = np.searchsorted(run, pairs["f1"][j])
        found[j] = k < len(run) and run[k] == pairs["f1"][j]
    return found


def subset_rows(pool: Pool, subset: np.ndarray) -> np.ndarray:
    """A row mask: the pool rows whose uid is in the subset (sorted, unique pairs)."""
    mask = np.zeros(pool.size, dtype=bool)
    if not len(subset):
        return mask
    for first, pairs in pool.uid_blocks():
        mask[first : first + len(pairs)] = _contains(subset, pairs)
    return mask


def extreme_rows(values: np.ndarray, mask: np.ndarray | None, m: int, high: bool) -> np.ndarray:
    """Up to m rows (of `mask`, None: all) with the highest or lowest scores, NaN never; ties
    go to the smaller row, so a column always gives the same rows."""
    part = np.array(values[mask] if mask is not None else values)
    scored = len(part) - int(np.count_nonzero(np.isnan(part)))
    if m <= 0 or scored == 0:
        return np.empty(0, dtype=np.int64)
    m = min(m, scored)
    at = scored - m if high else m - 1
    part.partition(at)
    kth = part[at]
    del part
    hit = values >= kth if high else values <= kth
    if mask is not None:
        hit &= mask
    rows = np.flatnonzero(hit)
    order = np.lexsort((rows, -values[rows] if high else values[rows]))
    return rows[order[:m]]


def sample_rows(
    values: np.ndarray, mask: np.ndarray | None, high: bool, count: int, band: int, rng
) -> np.ndarray:
    """`count` rows drawn (seeded) from the `band·count` rows nearest one end, best first."""
    rows = extreme_rows(values, mask, band * count, high)
    if len(rows) > count:
        rows = rng.choice(rows, count, replace=False)
    return rows[np.lexsort((rows, -values[rows]))]


@dataclass
class ColumnStats:
    """A column's row counts, quantiles, mean and histogram (pool, and subset rows)."""

    name: str
    rows: int
    nan: int
    quantiles: dict[float, float]
    mean: float
    edges: np.ndarray
    counts: np.ndarray
    kept: np.ndarray | None


def column_stats(name: str, values: np.ndarray, in_subset: np.ndarray | None, bins: int):
    """Quantiles, mean and histogram of a column's finite values."""
    finite = np.isfinite(values)
    part = values[finite]
    n = len(part)
    if n:
        lo, hi = float(part.min()), float(part.max())
        mean = float(part.mean(dtype=np.float64))
        found = np.quantile(part, QUANTILES, overwrite_input=True)
        quantiles = dict(zip(QUANTILES, found.astype(float).tolist()))
    else:
        quantiles, lo, hi, mean = {}, 0.0, 1.0, float("nan")
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    counts = np.histogram(part, edges)[0]
    del part
    kept = None
    if in_subset is not None:
        kept = np.histogram(values[finite & in_subset], edges)[0]
    return ColumnStats(name, len(values), len(values) - n, quantiles, mean, edges, counts, kept)


@dataclass
class StageView:
    """One replayed --keep stage: its record, cut-off, which side it keeps, and example rows
    just kept and just dropped (None when the stage could not be replayed)."""

    rule: str
    metric: str
    threshold: float | None
    low_kept: bool
    recorded: int | None
    replayed: int | None
    kept: np.ndarray | None = None
    dropped: np.ndarray | None = None


def replay(pool: Pool, record: dict, count: int, band: int, seed: int) -> list[StageView]:
    """The subset's --keep stages replayed on the pool with the selection's own rule code,
    and the rows sampled at each cut-off; a NormSim-D stage (it needs the store) ends it."""
    alive: np.ndarray | None = np.ones(pool.size, dtype=bool)
    views = []
    for index, stage in enumerate(record.get("stages") or []):
        rule = parse_rule(stage["rule"])
        low = rule.op in LOW_KEPT
        view = StageView(
            rule.text, rule.metric, stage.get("threshold"), low, stage.get("count"), None
        )
        views.append(view)
        if alive is None or rule.metric == NORMSIM_D or rule.metric not in pool_columns(pool):
            alive = None
            continue
        column = pool.column(rule.metric)
        after, done = apply_rule(
            rule, column, alive, pool.size, pool.pairs_at, record.get("ties") or EXACT
        )
        view.threshold, view.replayed = done.get("threshold"), done["count"]
        dropped = alive & ~after
        view.kept = sample_rows(
            column, after, low, count, band, np.random.default_rng([seed, 1, index])
        )
        view.dropped = sample_rows(
            column, dropped, not low, count, band, np.random.default_rng([seed, 2, index])
        )
        alive = after
    return views


def pool_columns(pool: Pool) -> set[str]:
    """Every column name of the pool's first file."""
    import pyarrow.parquet as pq

    return set(pq.read_schema(pool.paths[0]).names)
