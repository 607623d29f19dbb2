"""An append-only .npy file of fixed-shape rows, written through a memory map.

The data cache streams decoded images into it one at a time, so the pixels are never held
twice (a list, then `np.stack`). The file is preallocated for `capacity` rows and doubled when
full; `close` rewrites the header with the real row count and truncates the file. numpy pads an
.npy header so its first dimension can grow to 21 digits in place, which is what makes the
header rewrite possible without moving the data.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np


def _header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


class NpyRows:
    """Rows of shape `row_shape` appended to the .npy at `path` (which it creates)."""

    def __init__(
        self, path: str | os.PathLike, row_shape: tuple[int, ...], capacity: int, dtype=np.uint8
    ) -> None:
        self.path = Path(path)
        self.row_shape = tuple(int(d) for d in row_shape)
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.count = 0
        self.capacity = max(1, int(capacity))
        self.offset = len(_header((self.capacity, *self.row_shape), self.dtype))
        with open(self.path, "wb") as fh:
            fh.write(_header((self.capacity, *self.row_shape), self.dtype))
        self._map()

    def _map(self) -> None:
        with open(self.path, "r+b") as fh:
            fh.truncate(self.offset + self.capacity * self.row_bytes)
        self.rows = np.memmap(
            self.path,
            dtype=self.dtype,
            mode="r+",
            offset=self.offset,
            shape=(self.capacity, *self.row_shape),
        )

    def append(self, row: np.ndarray) -> int:
        """Store one row; returns its index."""
        if self.count == self.capacity:
            self.rows.flush()
            del self.rows
            self.capacity *= 2
            self._map()
        self.rows[self.count] = row
        self.count += 1
        return self.count - 1

    def rollback(self, count: int) -> None:
        """Forget every row from index `count` on (a shard that turned out broken)."""
        self.count = min(self.count, int(count))

    def close(self) -> int:
        """Write the real row count into the header and cut the file; returns the row count."""
        self.rows.flush()
        del self.rows
        header = _header((self.count, *self.row_shape), self.dtype)
        if len(header) != self.offset:
            raise RuntimeError(f"{self.path}: the .npy header changed size ({len(header)})")
        with open(self.path, "r+b") as fh:
            fh.write(header)
            fh.truncate(self.offset + self.count * self.row_bytes)
        return self.count
