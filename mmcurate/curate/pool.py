"""The candidate pool of `select`: uids and score columns, read from parquet one column at a time.

A SCORES directory holds `<stem>.scores.parquet` sidecars (what `mmcurate score` writes). A
directory without any, such as DataComp's metadata (`<stem>.parquet` with `uid` and the
precomputed `clip_l14_similarity_score` / `clip_b32_similarity_score`), is read through its
`<stem>.parquet` files instead. Only `uid` and the named columns are ever read: a rule reads
its column, and uids are read at the end for the survivors (and at a tied cut-off), so the
pool never holds every uid and every column at once.

Columns a score file lacks (captions, image sizes: what DataComp's named rules read) come from
the store's `<stem>.parquet` (`--store`, by default the metadata directory being selected),
row-aligned to the score file by uid.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmcurate.data.markers import check_stem_file
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


def _schema(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path)
    except Exception as exc:
        raise UsageError(f"unreadable parquet {path}: {exc}") from None


def locate(paths: Sequence[Path], store: Path | None, names: Sequence[str]) -> tuple[str, str, Any]:
    """(name, "pool", type) for the first of `names` the score files have, else (name, "store",
    type) from the store's stem parquets, judged on the first stem; ("", "", None) if none."""
    schema = _schema(paths[0])
    for name in names:
        if name in schema.names:
            return name, "pool", schema.field(name).type
    if store is not None:
        first = store / f"{sidecar_stem(paths[0])}{METADATA_SUFFIX}"
        if first.is_file():
            schema = _schema(first)
            for name in names:
                if name in schema.names:
                    return name, "store", schema.field(name).type
    return "", "", None


def check_store(paths: Sequence[Path], store: Path, columns: Sequence[str]) -> set[str]:
    """Every score file's stem has a store parquet with `columns` (else a UsageError naming it);
    returns the columns some store file holds as float64."""
    import pyarrow as pa

    wide: set[str] = set()
    for path in paths:
        stem_file = store / f"{sidecar_stem(path)}{METADATA_SUFFIX}"
        if not stem_file.is_file():
            raise UsageError(f"store {store} has no {stem_file.name} for the scores' stem")
        schema = _schema(stem_file)
        missing = [c for c in ("uid", *columns) if c not in schema.names]
        if missing:
            raise UsageError(f"{stem_file} has no column {missing[0]!r}")
        wide.update(c for c in columns if pa.types.is_float64(schema.field(c).type))
    return wide


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
    store: Path | None = None
    from_store: set[str] = field(default_factory=set)
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

    def store_rows(self, i: int) -> np.ndarray | None:
        """Row positions in the store's parquet of stem i's score rows (matched by uid), or
        None when they are the same rows."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        stem = self.stems[i]
        path = self.store / f"{stem}{METADATA_SUFFIX}"
        if path.resolve() == self.paths[i].resolve():
            return None
        try:
            theirs = pq.read_table(path, columns=["uid"]).column("uid")
        except Exception as exc:
            raise ShardError(f"{stem}: unreadable store parquet: {exc}") from None
        ours = self._table(i, ["uid"]).column("uid")
        if theirs.equals(ours):
            return None
        index = pc.index_in(ours, value_set=theirs)
        if index.null_count:
            raise ShardError(f"{stem}: {index.null_count} uid(s) of the scores are not in {path}")
        return index.to_numpy(zero_copy_only=False).astype(np.int64)

    def _store_table(self, i: int, columns: list[str]):
        """Store columns of stem i, in the score file's row order."""
        import pyarrow.parquet as pq

        path = self.store / f"{self.stems[i]}{METADATA_SUFFIX}"
        try:
            table = pq.read_table(path, columns=columns)
        except Exception as exc:
            raise ShardError(f"{self.stems[i]}: unreadable store parquet: {exc}") from None
        rows = self.store_rows(i)
        return table if rows is None else table.take(rows)

    def table(self, i: int, columns: Sequence[str]):
        """Columns of stem i, each from its score file or (`from_store`) the store's parquet."""
        import pyarrow as pa

        own = [c for c in columns if c not in self.from_store]
        other = [c for c in columns if c in self.from_store]
        parts = {}
        if own:
            table = self._table(i, own)
            parts.update({c: table.column(c) for c in own})
        if other:
            table = self._store_table(i, other)
            parts.update({c: table.column(c) for c in other})
        return pa.table({c: parts[c] for c in columns})

    def per_file(self, columns: Sequence[str], fn, dtype, desc: str) -> np.ndarray:
        """`fn(table, stem)` of each file's `columns`, one value per row, over the pool."""
        from mmcurate.progress import progress_bar

        out = np.empty(self.size, dtype=dtype)
        bar = progress_bar(range(len(self.paths)), desc=desc, disable=not self.progress)
        for i in bar:
            out[self.offsets[i] : self.offsets[i + 1]] = fn(self.table(i, columns), self.stems[i])
        return out

    def column(self, metric: str) -> np.ndarray:
        """One score column over the pool: float64 when a file stores it so (DataComp's),
        else float32."""

        def values(table, stem: str) -> np.ndarray:
            found = table.column(metric)
            if not _is_number(found.type):
                raise ShardError(f"{stem}: score column {metric!r} holds {found.type}, not numbers")
            return found.to_numpy(zero_copy_only=False)

        dtype = np.float64 if metric in self.wide else np.float32
        return self.per_file([metric], values, dtype, f"select: reading {metric}")

    def pairs_at(self, rows: np.ndarray) -> np.ndarray:
        """The uid pairs of ascending row positions; every file's uids are read and checked,
        block by block, so parsing never holds more than a block's temporaries."""
        if self._pairs is not None:
            return self._pairs[rows]
        out = np.empty(len(rows), dtype=UID_DTYPE)
        for first, pairs in self.uid_blocks():
            a, b = np.searchsorted(rows, [first, first + len(pairs)])
            out[a:b] = pairs[rows[a:b] - first]
        return out

    def uid_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, uid pairs) of each block of every file in row order, parsed and checked
        a block at a time; a bad uid column fails naming its stem."""
        for i in range(len(self.paths)):
            column = self._table(i, ["uid"]).column("uid").combine_chunks()
            lo = int(self.offsets[i])
            for start in range(0, len(column), UID_BLOCK):
                try:
                    pairs = hex_to_pairs(column.slice(start, UID_BLOCK))
                except ValueError as exc:
                    raise ShardError(f"{self.stems[i]}: bad uid column: {exc}") from None
                yield lo + start, pairs

    @property
    def pairs(self) -> np.ndarray:
        """Every uid of the pool, read once on first use (the NormSim-D stage needs them)."""
        if self._pairs is None:
            self._pairs = self.pairs_at(np.arange(self.size))
        return self._pairs


def open_pool(
    paths: Sequence[Path],
    rows: Sequence[int],
    wide: set[str],
    progress: bool = True,
    store: Path | None = None,
    from_store: set[str] | None = None,
) -> Pool:
    """A pool over the score files with these row counts and float64 metrics, the `from_store`
    columns read from `store`; nothing is read yet."""
    offsets = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])
    stems = [sidecar_stem(p) for p in paths]
    return Pool(list(paths), offsets, stems, set(wide), progress, store, set(from_store or ()))
