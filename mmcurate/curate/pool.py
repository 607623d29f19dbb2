"""The candidate pool of `select`: uids and score columns, read from parquet one column at a time.

A SCORES directory holds `<stem>.scores.parquet` sidecars (what `mmcurate score` writes). A
directory without any, such as DataComp's metadata (`<stem>.parquet` with `uid` and the
precomputed `clip_l14_similarity_score` / `clip_b32_similarity_score`), is read through its
`<stem>.parquet` files instead. Only `uid` and the named columns are ever read: a rule reads
its column, and uids are read at the end for the survivors (and at a tied cut-off), so the
pool never holds every uid and every column at once.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmcurate.data.store import check_stem_file
from mmcurate.data.uid import UID_DTYPE, hex_to_pairs
from mmcurate.errors import ShardError, UsageError

SIDECAR_SUFFIX = ".scores.parquet"
METADATA_SUFFIX = ".parquet"
DONE_SUFFIX = ".done.json"
UID_BLOCK = 8192


def find_sidecars(scores_dir: str | os.PathLike) -> list[Path]:
    """The score files of a SCORES directory, sorted by stem: its `.scores.parquet` sidecars,
    else (a DataComp metadata directory) its `<stem>.parquet` files."""
    root = Path(scores_dir)
    if root.is_file():
        raise UsageError(
            f"SCORES must be a directory of {SIDECAR_SUFFIX} files, {root} is a file"
            " (give one --union/--intersect per subset file)"
        )
    if not root.is_dir():
        raise UsageError(f"scores directory not found: {root}")
    paths = sorted(root.glob(f"*{SIDECAR_SUFFIX}"))
    if paths:
        return paths
    paths = _finished(root, sorted(root.glob(f"*{METADATA_SUFFIX}")))
    if not paths:
        raise UsageError(f"no {SIDECAR_SUFFIX} (or DataComp metadata .parquet) files in {root}")
    return paths


def _finished(root: Path, paths: list[Path]) -> list[Path]:
    """A directory with done markers keeps only the stems that have one (warning about the
    rest); one with none (DataComp's) is taken whole."""
    if not any(root.glob(f"*{DONE_SUFFIX}")):
        return paths
    done = [p for p in paths if (root / f"{sidecar_stem(p)}{DONE_SUFFIX}").is_file()]
    left = [sidecar_stem(p) for p in paths if p not in done]
    if left:
        warnings.warn(
            f"{len(left)} unfinished stem(s) left out of {root}: {', '.join(left[:5])}",
            stacklevel=3,
        )
    return done


def is_metadata(path: Path) -> bool:
    """True for a `<stem>.parquet` metadata file (not a score sidecar)."""
    return not path.name.endswith(SIDECAR_SUFFIX)


def sidecar_stem(path: Path) -> str:
    """The shard stem a score file belongs to."""
    suffix = METADATA_SUFFIX if is_metadata(path) else SIDECAR_SUFFIX
    return path.name[: -len(suffix)]


def _is_number(dtype) -> bool:
    import pyarrow as pa

    return pa.types.is_floating(dtype) or pa.types.is_integer(dtype)


def sidecar_rows(paths: Sequence[Path], metrics: Sequence[str]) -> tuple[list[int], set[str]]:
    """Row counts from the parquet footers, and the metrics some file stores as float64; a
    missing metric column is refused before work, in one line listing the number columns
    that file does have."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    wide: set[str] = set()
    for path in paths:
        check_stem_file(path.parent, sidecar_stem(path), path.name)
        try:
            meta = pq.read_metadata(path)
            schema = meta.schema.to_arrow_schema()
        except Exception as exc:
            raise UsageError(f"unreadable score file {path}: {exc}") from None
        missing = [m for m in ("uid", *metrics) if m not in schema.names]
        if missing:
            have = [f.name for f in schema if f.name != "uid" and _is_number(f.type)]
            hint = ""
            if is_metadata(path):
                hint = f"; no {SIDECAR_SUFFIX} files there, run `mmcurate score` for computed ones"
            raise UsageError(
                f"{path.name} has no column {missing[0]!r} "
                f"(score columns there: {', '.join(have) or 'none'}{hint})"
            )
        rows.append(meta.num_rows)
        wide.update(m for m in metrics if pa.types.is_float64(schema.field(m).type))
    return rows, wide


@dataclass
class Pool:
    """The candidate pool: its score files, their row offsets, and columns read on demand."""

    paths: list[Path]
    offsets: np.ndarray
    stems: list[str]
    wide: set[str] = field(default_factory=set)
    progress: bool = True
    _pairs: np.ndarray | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        """Rows in the pool."""
        return int(self.offsets[-1])

    def _table(self, i: int, columns: list[str]):
        import pyarrow as pa
        import pyarrow.parquet as pq

        # Arrow's allocator keeps freed blocks; hand the last file's back before the next read.
        pa.default_memory_pool().release_unused()
        stem = self.stems[i]
        try:
            table = pq.read_table(self.paths[i], columns=columns)
        except Exception as exc:
            raise ShardError(f"{stem}: unreadable score file: {exc}") from None
        if table.num_rows != self.offsets[i + 1] - self.offsets[i]:
            raise ShardError(f"{stem}: score file changed while reading")
        return table

    def column(self, metric: str) -> np.ndarray:
        """One score column over the pool: float64 when a file stores it so (DataComp's),
        else float32."""
        from mmcurate.progress import progress_bar

        dtype = np.float64 if metric in self.wide else np.float32
        out = np.empty(self.size, dtype=dtype)
        bar = progress_bar(
            range(len(self.paths)), desc=f"select: reading {metric}", disable=not self.progress
        )
        for i in bar:
            values = self._table(i, [metric]).column(metric)
            if not _is_number(values.type):
                raise ShardError(
                    f"{self.stems[i]}: score column {metric!r} holds {values.type}, not numbers"
                )
            lo, hi = self.offsets[i], self.offsets[i + 1]
            out[lo:hi] = values.to_numpy(zero_copy_only=False)
        return out

    def pairs_at(self, rows: np.ndarray) -> np.ndarray:
        """The uid pairs of ascending row positions; every file's uids are read and checked,
        block by block, so parsing never holds more than a block's temporaries."""
        if self._pairs is not None:
            return self._pairs[rows]
        out = np.empty(len(rows), dtype=UID_DTYPE)
        for i in range(len(self.paths)):
            column = self._table(i, ["uid"]).column("uid").combine_chunks()
            lo = int(self.offsets[i])
            for start in range(0, len(column), UID_BLOCK):
                try:
                    pairs = hex_to_pairs(column.slice(start, UID_BLOCK))
                except ValueError as exc:
                    raise ShardError(f"{self.stems[i]}: bad uid column: {exc}") from None
                a, b = np.searchsorted(rows, [lo + start, lo + start + len(pairs)])
                out[a:b] = pairs[rows[a:b] - (lo + start)]
        return out

    @property
    def pairs(self) -> np.ndarray:
        """Every uid of the pool, read once on first use (the NormSim-D stage needs them)."""
        if self._pairs is None:
            self._pairs = self.pairs_at(np.arange(self.size))
        return self._pairs


def open_pool(
    paths: Sequence[Path], rows: Sequence[int], wide: set[str], progress: bool = True
) -> Pool:
    """A pool over the score files with these row counts and float64 metrics; nothing is read
    yet."""
    offsets = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])
    return Pool(list(paths), offsets, [sidecar_stem(p) for p in paths], set(wide), progress)
