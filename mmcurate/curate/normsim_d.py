"""The NormSim-D stage of `select`: the survivors' image embeddings, memory-mapped from the store
stem by stem, shrunk to the target size by `normsim_d_run` (ties to the smaller uid); the
record says how often the pool was read and how many bytes."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmcurate.curate.pool import Pool
from mmcurate.curate.rules import NORMSIM_D, Rule, keep_count
from mmcurate.data.uid import hex_to_pairs, pair_order
from mmcurate.errors import ShardError, UsageError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_memory(text: str) -> int:
    """A memory size such as 8GiB, 500MB or 4096 (bytes), as a positive number of bytes."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = found.group(2).lower() if found else None
    if unit not in _UNITS or not float(found.group(1)) * _UNITS[unit] >= 1:
        raise UsageError(
            f"--normsim-d-memory must be a size such as 8GiB, 500MB or a byte count, got {text!r}"
        )
    return int(float(found.group(1)) * _UNITS[unit])


class StemRows:
    """One stem's survivors as a row source over the store's memory map: reads only the rows
    asked for, and counts the bytes it read."""

    def __init__(self, chunks: SurvivorChunks, index: int) -> None:
        self.chunks, self.index = chunks, index

    def __len__(self) -> int:
        return len(self.chunks.rows[self.index])

    def __getitem__(self, key) -> np.ndarray:
        arr = self.chunks.array(self.index)
        out = np.asarray(arr[self.chunks.rows[self.index][key]])
        self.chunks.bytes_read += out.nbytes
        return out


class SurvivorChunks(Sequence):
    """Survivors' image embeddings per stem, memory-mapped from the store and read on access;
    `bytes_read` counts every byte NormSim-D asked for."""

    def __init__(
        self, store: str | os.PathLike, img_key: str, groups: Sequence[tuple[str, np.ndarray]]
    ) -> None:
        from mmcurate.data.store import read_meta

        self.store, self.img_key = store, img_key
        self.stems: list[str] = []
        self.rows: list[np.ndarray] = []
        self._nrows: list[int] = []
        self._maps: dict[int, np.ndarray] = {}
        self.bytes_read = 0
        for stem, wanted in groups:
            meta = read_meta(store, stem, ["uid"])
            try:
                have = hex_to_pairs(meta.column("uid"))
            except ValueError as exc:
                raise ShardError(f"{stem}: bad uid column in the store: {exc}") from None
            order = pair_order(have)
            sorted_have = have[order]
            idx = np.minimum(np.searchsorted(sorted_have, wanted), max(len(have) - 1, 0))
            if len(have) == 0 or not np.all(sorted_have[idx] == wanted):
                raise ShardError(f"{stem}: survivors missing from the store's {stem}.parquet")
            self.stems.append(stem)
            self.rows.append(order[idx])
            self._nrows.append(meta.num_rows)

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return StemRows(self, i % len(self))

    def array(self, i: int) -> np.ndarray:
        """The memory-mapped image array of stem i, opened once."""
        if i not in self._maps:
            from mmcurate.data.store import read_arrays

            arrays = read_arrays(self.store, self.stems[i], [self.img_key], rows=self._nrows[i])
            self._maps[i] = arrays[self.img_key]
        return self._maps[i]


def normsim_d_stage(
    rule: Rule,
    pool: Pool,
    survivors: np.ndarray,
    store: str | os.PathLike,
    img_key: str,
    iters: int,
    seed: int,
    memory_bytes: int | None = None,
) -> tuple[np.ndarray, dict]:
    """NormSim-D over the survivors, whose embeddings are read stem by stem from the store;
    `memory_bytes` caps the rows it holds (None: `default_memory_bytes()`)."""
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
        from mmcurate.curate.normsim_d_math import normsim_d_run

        file_of = np.searchsorted(pool.offsets, survivors, side="right") - 1
        starts = np.flatnonzero(np.r_[True, np.diff(file_of) != 0])
        ends = np.r_[starts[1:], len(survivors)]
        groups = [
            (pool.stems[int(file_of[a])], pool.pairs[survivors[a:b]]) for a, b in zip(starts, ends)
        ]
        chunks = SurvivorChunks(store, img_key, groups)
        mask, reads = normsim_d_run(
            chunks,
            target,
            num_iters=iters,
            seed=seed,
            uids=pool.pairs[survivors],
            memory_bytes=memory_bytes,
        )
        if mask.shape != survivors.shape:
            raise ShardError(f"normsim_d returned {mask.shape[0]} flags for {len(survivors)} rows")
        keep = survivors[mask]
        record["reads"] = {
            "passes": reads.passes,
            "rows": reads.rows,
            "pool_reads": round(reads.rows / len(survivors), 3),
            "bytes": chunks.bytes_read,
            "memory_bytes": reads.memory_bytes,
        }
    record["count"] = int(len(keep))
    return keep, record
