"""Selection over score sidecars (SPEC §5): chained --keep rules, ties by uid, subset algebra."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from mmcurate.data.atomic import save_npy_atomic, write_json_atomic
from mmcurate.data.uid import UID_DTYPE, pair_to_uid
from mmcurate.errors import ShardError, UsageError

SIDECAR_SUFFIX = ".scores.parquet"
DEFAULT_RECIPE = ("negclip:0.3", "normsim_inf:0.2")
NORMSIM_D = "normsim_d"
_OPS = (">=", "<=", ">", "<")
_COMPARE = {
    ">=": np.greater_equal,
    "<=": np.less_equal,
    ">": np.greater,
    "<": np.less,
}
_METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEX_LUT = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_LUT[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_LUT[_c] = 10 + _i


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


# ---------------------------------------------------------------------------------------------
# uid pairs: set algebra with lexsort (faster than sorting the structured array itself)


def _pairs(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    out = np.empty(len(hi), dtype=UID_DTYPE)
    out["f0"] = hi
    out["f1"] = lo
    return out


def _order(pairs: np.ndarray) -> np.ndarray:
    return np.lexsort((pairs["f1"], pairs["f0"]))


def _starts(sorted_pairs: np.ndarray) -> np.ndarray:
    """True where a sorted array holds a value different from the one before."""
    new = np.ones(len(sorted_pairs), dtype=bool)
    if len(sorted_pairs) > 1:
        hi, lo = sorted_pairs["f0"], sorted_pairs["f1"]
        new[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    return new


def sort_unique_pairs(pairs: np.ndarray) -> np.ndarray:
    """Sorted, duplicate-free copy of a (u8, u8) array, as subset files must be."""
    s = pairs[_order(pairs)]
    return _pairs(s["f0"], s["f1"])[_starts(s)]


def first_occurrence(pairs: np.ndarray) -> np.ndarray:
    """Mask of the rows holding the first occurrence of their uid."""
    order = _order(pairs)
    mask = np.zeros(len(pairs), dtype=bool)
    mask[order[_starts(pairs[order])]] = True
    return mask


def member_mask(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For unique arrays a and b: which elements of a are in b."""
    both = np.concatenate([_pairs(a["f0"], a["f1"]), _pairs(b["f0"], b["f1"])])
    order = _order(both)
    s = both[order]
    twin = np.zeros(len(s), dtype=bool)
    if len(s) > 1:
        twin[:-1] = ~_starts(s)[1:]
    from_a = order < len(a)
    mask = np.zeros(len(a), dtype=bool)
    mask[order[from_a]] = twin[from_a]
    return mask


def union_pairs(*arrays: np.ndarray) -> np.ndarray:
    """Sorted unique union of subsets."""
    parts = [_pairs(a["f0"], a["f1"]) for a in arrays]
    return sort_unique_pairs(np.concatenate(parts) if parts else np.empty(0, UID_DTYPE))


def intersect_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted intersection of two subsets."""
    a = sort_unique_pairs(a)
    return a[member_mask(a, sort_unique_pairs(b))]


def difference_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted elements of a that are not in b."""
    a = sort_unique_pairs(a)
    return a[~member_mask(a, sort_unique_pairs(b))]


def hex_to_pairs(column: Any) -> np.ndarray:
    """A pyarrow column of 32-hex-char uids as (u8, u8) pairs, parsed without Python objects."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        raise ValueError(f"uid column has type {arr.type}, expected strings")
    if arr.null_count:
        raise ValueError(f"{arr.null_count} null uid(s)")
    n = len(arr)
    if n == 0:
        return np.empty(0, dtype=UID_DTYPE)
    off_type = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=off_type)[arr.offset : arr.offset + n + 1]
    if not np.all(np.diff(offsets) == 32):
        raise ValueError("uids must be 32 hex characters")
    raw = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    nibbles = _HEX_LUT[raw].reshape(n, 32)
    if (nibbles == 255).any():
        raise ValueError("uids must be 32 hex characters")
    packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
    big_endian = np.ascontiguousarray(packed).view(">u8")
    return _pairs(big_endian[:, 0], big_endian[:, 1])


# ---------------------------------------------------------------------------------------------
# pure selection steps


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


# ---------------------------------------------------------------------------------------------
# I/O: sidecars, subset files, the embedding store


def find_sidecars(scores_dir: str | os.PathLike) -> list[Path]:
    """The `<stem>.scores.parquet` files of a SCORES directory, sorted by stem."""
    root = Path(scores_dir)
    if root.is_file():
        raise UsageError(
            f"SCORES must be a directory of {SIDECAR_SUFFIX} files, {root} is a file"
            " (give one --union/--intersect per subset file)"
        )
    if not root.is_dir():
        raise UsageError(f"scores directory not found: {root}")
    paths = sorted(root.glob(f"*{SIDECAR_SUFFIX}"))
    if not paths:
        raise UsageError(f"no {SIDECAR_SUFFIX} files in {root}")
    return paths


def sidecar_stem(path: Path) -> str:
    """The shard stem a sidecar belongs to."""
    return path.name[: -len(SIDECAR_SUFFIX)]


def load_subset(path: str | os.PathLike) -> np.ndarray:
    """A subset file as sorted unique (u8, u8) pairs; never unpickles, validates the dtype."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"subset file not found: {p}")
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise UsageError(f"unreadable subset file {p}: {str(exc).splitlines()[0]}") from None
    names = getattr(arr, "dtype", np.dtype("O")).names
    if (
        not isinstance(arr, np.ndarray)
        or arr.ndim != 1
        or names is None
        or len(names) != 2
        or any(arr.dtype[n].kind != "u" or arr.dtype[n].itemsize != 8 for n in names)
    ):
        kind = type(arr).__name__ if not isinstance(arr, np.ndarray) else f"{arr.dtype} {arr.shape}"
        raise UsageError(f"{p} is not a subset file: need a 1-d (u8, u8) array, got {kind}")
    return sort_unique_pairs(_pairs(arr[names[0]], arr[names[1]]))


def _sidecar_rows(paths: Sequence[Path], metrics: Sequence[str]) -> list[int]:
    """Row counts from the parquet footers; a missing metric column is refused before work."""
    import pyarrow.parquet as pq

    rows = []
    for path in paths:
        try:
            meta = pq.read_metadata(path)
        except Exception as exc:
            raise UsageError(f"unreadable score sidecar {path}: {exc}") from None
        schema = meta.schema.to_arrow_schema()
        missing = [m for m in ("uid", *metrics) if m not in schema.names]
        if missing:
            have = sorted(set(schema.names) - {"uid"})
            raise UsageError(
                f"{path.name} has no column {missing[0]!r} (score metrics there: {', '.join(have)})"
            )
        rows.append(meta.num_rows)
    return rows


@dataclass
class Pool:
    """The candidate pool: uid pairs, the needed score columns, and sidecar row offsets."""

    pairs: np.ndarray
    scores: dict[str, np.ndarray]
    offsets: np.ndarray
    stems: list[str]


def read_pool(
    paths: Sequence[Path], metrics: Sequence[str], rows: Sequence[int], progress: bool = True
) -> Pool:
    """Read only `uid` and the named score columns into preallocated arrays."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    offsets = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])
    total = int(offsets[-1])
    pairs = np.empty(total, dtype=UID_DTYPE)
    scores = {m: np.empty(total, dtype=np.float32) for m in metrics}
    bar = tqdm(paths, desc="select: reading scores", unit="file", disable=not progress)
    for i, path in enumerate(bar):
        stem = sidecar_stem(path)
        try:
            table = pq.read_table(path, columns=["uid", *metrics])
        except Exception as exc:
            raise ShardError(f"{stem}: unreadable score sidecar: {exc}") from None
        if table.num_rows != rows[i]:
            raise ShardError(f"{stem}: sidecar changed while reading")
        lo, hi = offsets[i], offsets[i + 1]
        try:
            pairs[lo:hi] = hex_to_pairs(table.column("uid"))
        except ValueError as exc:
            raise ShardError(f"{stem}: bad uid column: {exc}") from None
        for m in metrics:
            column = table.column(m)
            if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
                raise ShardError(f"{stem}: score column {m!r} holds {column.type}, not numbers")
            scores[m][lo:hi] = column.to_numpy(zero_copy_only=False)
    return Pool(pairs, scores, offsets, [sidecar_stem(p) for p in paths])


class SurvivorChunks(Sequence):
    """Survivors' image embeddings per stem, memory-mapped from the store and read on access."""

    def __init__(
        self, store: str | os.PathLike, img_key: str, groups: Sequence[tuple[str, np.ndarray]]
    ) -> None:
        from mmcurate.data.store import read_meta

        self.store, self.img_key = store, img_key
        self._stems: list[str] = []
        self._rows: list[np.ndarray] = []
        self._nrows: list[int] = []
        self._maps: dict[int, np.ndarray] = {}
        for stem, wanted in groups:
            meta = read_meta(store, stem, ["uid"])
            try:
                have = hex_to_pairs(meta.column("uid"))
            except ValueError as exc:
                raise ShardError(f"{stem}: bad uid column in the store: {exc}") from None
            order = _order(have)
            sorted_have = have[order]
            idx = np.minimum(np.searchsorted(sorted_have, wanted), max(len(have) - 1, 0))
            if len(have) == 0 or not np.all(sorted_have[idx] == wanted):
                raise ShardError(f"{stem}: survivors missing from the store's {stem}.parquet")
            self._stems.append(stem)
            self._rows.append(order[idx])
            self._nrows.append(meta.num_rows)

    def __len__(self) -> int:
        return len(self._stems)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if i not in self._maps:
            from mmcurate.data.store import read_arrays

            arrays = read_arrays(self.store, self._stems[i], [self.img_key], rows=self._nrows[i])
            self._maps[i] = arrays[self.img_key]
        return np.asarray(self._maps[i][self._rows[i]], dtype=np.float32)


def _normsim_d_stage(
    rule: Rule,
    pool: Pool,
    survivors: np.ndarray,
    store: str | os.PathLike,
    img_key: str,
    iters: int,
    seed: int,
) -> tuple[np.ndarray, dict]:
    """NormSim-D over the survivors, whose embeddings are read stem by stem from the store."""
    target = keep_count(rule.fraction, len(pool.pairs))
    record: dict[str, Any] = {
        "rule": rule.text,
        "metric": NORMSIM_D,
        "kind": "normsim_d",
        "fraction": rule.value,
        "target": target,
        "threshold": None,
        "input": int(len(survivors)),
        "nan": 0,
        "iters": iters,
        "seed": seed,
    }
    if target >= len(survivors) or target == 0:
        keep = survivors if target else survivors[:0]
    else:
        from mmcurate.curate.scores import normsim_d_keep

        file_of = np.searchsorted(pool.offsets, survivors, side="right") - 1
        starts = np.flatnonzero(np.r_[True, np.diff(file_of) != 0])
        ends = np.r_[starts[1:], len(survivors)]
        groups = [
            (pool.stems[int(file_of[a])], pool.pairs[survivors[a:b]]) for a, b in zip(starts, ends)
        ]
        chunks = SurvivorChunks(store, img_key, groups)
        mask = np.asarray(normsim_d_keep(chunks, target, num_iters=iters, seed=seed), dtype=bool)
        if mask.shape != survivors.shape:
            raise ShardError(f"normsim_d returned {mask.shape[0]} flags for {len(survivors)} rows")
        keep = survivors[mask]
    record["count"] = int(len(keep))
    return keep, record


def select(
    scores_dir: str | os.PathLike | None,
    rules: Sequence[str] = (),
    *,
    union: Sequence[str | os.PathLike] = (),
    intersect: Sequence[str | os.PathLike] = (),
    store: str | os.PathLike | None = None,
    img_key: str = "img",
    normsim_d_iters: int = 500,
    seed: int = 0,
    progress: bool = True,
) -> tuple[np.ndarray, dict]:
    """Run the --keep stages, then (result ∪ unions) ∩ intersects; returns (subset, report)."""
    if scores_dir is None and rules:
        raise UsageError("--keep needs a SCORES directory")
    if scores_dir is None and not union:
        raise UsageError("give a SCORES directory or at least one --union subset file")
    parsed = [parse_rule(r) for r in (rules or (DEFAULT_RECIPE if scores_dir else ()))]
    if normsim_d_iters < 1:
        raise UsageError("--normsim-d-iters must be at least 1")
    uses_d = any(r.metric == NORMSIM_D for r in parsed)
    if uses_d and store is None:
        raise UsageError("--keep normsim_d needs --store STORE (the embedding store)")
    if scores_dir is not None:
        paths = find_sidecars(scores_dir)
        metrics = list(dict.fromkeys(r.metric for r in parsed if r.metric != NORMSIM_D))
        rows = _sidecar_rows(paths, metrics)
        if uses_d:
            from mmcurate.data.store import finished_stems

            absent = sorted({sidecar_stem(p) for p in paths} - set(finished_stems(store)))
            if absent:
                raise UsageError(
                    f"store {store} lacks stem(s) of the scores: {', '.join(absent[:5])}"
                )
    union_sets = [(str(p), load_subset(p)) for p in union]
    intersect_sets = [(str(p), load_subset(p)) for p in intersect]
    report: dict[str, Any] = {"scores": None, "pool": 0, "stages": [], "seed": seed}

    selected = np.empty(0, dtype=UID_DTYPE)
    if scores_dir is not None:
        pool = read_pool(paths, metrics, rows, progress)
        n = len(pool.pairs)
        survivors = np.arange(n)
        for rule in parsed:
            if rule.metric == NORMSIM_D:
                survivors, record = _normsim_d_stage(
                    rule, pool, survivors, store, img_key, normsim_d_iters, seed
                )
            else:
                survivors, record = apply_rule(
                    rule, pool.scores[rule.metric], pool.pairs, survivors, n
                )
            report["stages"].append(record)
        selected = sort_unique_pairs(pool.pairs[survivors])
        report.update(
            scores=str(scores_dir),
            sidecars=len(paths),
            pool=n,
            selected=int(len(selected)),
            duplicate_uids=int(len(survivors) - len(selected)),
        )
        if uses_d:
            report.update(store=str(store), img_key=img_key, normsim_d_iters=normsim_d_iters)

    result = union_pairs(selected, *(s for _, s in union_sets))
    report["union"] = [{"path": p, "count": int(len(s))} for p, s in union_sets]
    report["after_union"] = int(len(result))
    for _, s in intersect_sets:
        result = intersect_pairs(result, s)
    report["intersect"] = [{"path": p, "count": int(len(s))} for p, s in intersect_sets]
    report["count"] = int(len(result))
    return result, report


def write_subset(out: str | os.PathLike, subset: np.ndarray, report: dict) -> Path:
    """Save subset.npy and, beside it, its subset.json record; returns the json path."""
    out = Path(out)
    if subset.dtype != UID_DTYPE:
        raise ValueError(f"subset dtype must be {UID_DTYPE}, got {subset.dtype}")
    save_npy_atomic(out, subset)
    record_path = out.with_suffix(".json")
    write_json_atomic(record_path, {**report, "subset": str(out)})
    return record_path


def uid_examples(pairs: np.ndarray, limit: int = 5) -> list[str]:
    """A few uids in their hex form, for summaries."""
    return [pair_to_uid(int(p["f0"]), int(p["f1"])) for p in pairs[:limit]]
