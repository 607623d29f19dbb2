"""The candidate pool of `select`: uids and the named score columns, read from score sidecars."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmcurate.data.uid import UID_DTYPE, hex_to_pairs
from mmcurate.errors import ShardError, UsageError

SIDECAR_SUFFIX = ".scores.parquet"


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


def sidecar_rows(paths: Sequence[Path], metrics: Sequence[str]) -> list[int]:
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

    from mmcurate.progress import progress_bar

    offsets = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])
    total = int(offsets[-1])
    pairs = np.empty(total, dtype=UID_DTYPE)
    scores = {m: np.empty(total, dtype=np.float32) for m in metrics}
    bar = progress_bar(paths, desc="select: reading scores", unit="file", disable=not progress)
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
