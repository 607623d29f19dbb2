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
