"""Score windows: consecutive store stems of at least `window` rows, one work item each.

negCLIPLoss batches are drawn within a window, so scores depend only on (embeddings, window
grouping, B, K, τ, seed) and not on the executor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmcurate.curate.rows import native
from mmcurate.curate.score_config import ScoreJob
from mmcurate.data.markers import sizes_ok
from mmcurate.data.store import finished_stems, read_done
from mmcurate.errors import UsageError


@dataclass(frozen=True)
class WindowItem:
    """A score work item: window `index` and its stems, named `w<index>:<first>..<last>`."""

    name: str
    index: int
    stems: list[str]


def plan_windows(
    counts: Sequence[tuple[str, int]], window: int, batch_size: int
) -> list[list[str]]:
    """Consecutive stems in windows of >= `window` rows; a remainder < B joins the last window."""
    groups: list[list[str]] = []
    current: list[str] = []
    size = 0
    for stem, rows in counts:
        current.append(stem)
        size += rows
        if size >= window:
            groups.append(current)
            current, size = [], 0
    if current:
        if groups and size < batch_size:
            groups[-1].extend(current)
        else:
            groups.append(current)
    return groups


def _row_count(store: str, stem: str) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(Path(store) / f"{stem}.parquet").metadata.num_rows
    except Exception:
        return 0


def window_items(job: ScoreJob) -> list[WindowItem]:
    """The work items of a store, one per window."""
    stems = finished_stems(job.store)
    if not stems:
        raise UsageError(f"no finished stems in store {job.store}")
    counts = [(s, _row_count(job.store, s)) for s in stems]
    items = []
    for i, group in enumerate(plan_windows(counts, job.window, job.batch_size)):
        span = group[0] if len(group) == 1 else f"{group[0]}..{group[-1]}"
        items.append(WindowItem(f"w{i:05d}:{span}", i, group))
    return items


def window_is_done(job: ScoreJob, item: WindowItem) -> bool:
    """A window is done when every stem has a marker written with these settings and grouping."""
    sig = job.signature()
    for stem in item.stems:
        marker = read_done(job.out, stem)
        if not marker or marker.get("config") != sig or marker.get("window_stems") != item.stems:
            return False
        if not sizes_ok(marker, job.out):
            return False
    return True


class WindowRows:
    """The valid rows of a window's stems as one lazy (n, d) matrix, gathered as float32, or
    copied once to a device in the stems' own dtype (`tensor`)."""

    def __init__(self, parts: Sequence[tuple[np.ndarray, np.ndarray]], dim: int) -> None:
        self.parts = list(parts)
        self.offsets = np.concatenate([[0], np.cumsum([len(r) for _, r in self.parts])]).astype(
            np.int64
        )
        self.shape = (int(self.offsets[-1]), dim)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        idx = (
            np.arange(*key.indices(len(self)), dtype=np.int64)
            if isinstance(key, slice)
            else np.asarray(key, dtype=np.int64)
        )
        out = np.empty((idx.size, self.shape[1]), dtype=np.float32)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        bounds = np.searchsorted(sorted_idx, self.offsets)
        for p, (arr, rows) in enumerate(self.parts):
            lo, hi = bounds[p], bounds[p + 1]
            if lo < hi:
                local = rows[sorted_idx[lo:hi] - self.offsets[p]]
                out[order[lo:hi]] = arr[local]
        return out

    def tensor(self, dev: torch.device) -> torch.Tensor:
        """Every row on `dev` in the stems' dtype (float16 for a store), copied stem by stem."""
        dtypes = {arr.dtype.newbyteorder("=") for arr, _ in self.parts}
        dtype = torch.float16 if dtypes == {np.dtype(np.float16)} else torch.float32
        out = torch.empty(self.shape, dtype=dtype, device=dev)
        for p, (arr, rows) in enumerate(self.parts):
            lo, hi = int(self.offsets[p]), int(self.offsets[p + 1])
            if hi > lo:
                out[lo:hi] = torch.from_numpy(native(arr[rows])).to(device=dev, dtype=dtype)
        return out
