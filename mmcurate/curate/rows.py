"""Row sources of the score math: (n, d) embeddings read block by block as float32.

A row source is a numpy array, a memory map, or any object with `len()` and numpy-style indexing
by a slice or an integer array (the score stage passes a lazy view over several stems). Rows are
read block by block, so a float16 memory map is never loaded whole. Compute runs in torch on
`device` (CPU or CUDA, the same code path).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

Rows = Any  # (n, d) array-like supporting len(), x[slice] and x[int array]
DEFAULT_BLOCK = 65536


def torch_device(device: str | torch.device | None) -> torch.device:
    """`auto` (or None) is CUDA when present, else the CPU; anything else as named."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def as_f32(rows: Rows, key: Any) -> np.ndarray:
    """Rows selected by `key` as a contiguous float32 array."""
    return np.ascontiguousarray(np.asarray(rows[key]), dtype=np.float32)


def blocks(n: int, block: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive blocks covering n rows."""
    for start in range(0, n, block):
        yield start, min(start + block, n)


def row_blocks(
    rows: Rows, block: int, dev: torch.device
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, stop, float32 tensor on dev) per block of rows; a memmap is read block by block."""
    for r0, r1 in blocks(len(rows), block):
        yield r0, r1, torch.from_numpy(as_f32(rows, slice(r0, r1))).to(dev)


def native(a: np.ndarray) -> np.ndarray:
    """`a` in the machine's byte order (torch refuses others), copied only when it differs."""
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def device_rows(rows: Rows, dev: torch.device, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """All rows as one tensor on `dev`, copied once block by block in their stored dtype:
    float16 stays float16 (a store's window), anything else becomes float32."""
    if isinstance(rows, torch.Tensor):
        return rows.to(dev)
    if hasattr(rows, "tensor"):
        return rows.tensor(dev)
    n = len(rows)
    first = np.asarray(rows[0:1])
    dtype = torch.float16 if first.dtype == np.float16 else torch.float32
    out = torch.empty((n, first.shape[1]), dtype=dtype, device=dev)
    for r0, r1 in blocks(n, block):
        part = np.ascontiguousarray(native(np.asarray(rows[r0:r1])))
        out[r0:r1] = torch.from_numpy(part).to(device=dev, dtype=dtype)
    return out
