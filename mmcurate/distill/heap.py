"""The C heap of a training process: freed tensor memory kept for the next step.

A CPU training step allocates and frees the same large activations every time. glibc's defaults
hand tensors above 128 KiB to fresh mmaps or trim the heap whenever 32 MiB lie free at its top,
so the next step faults every page back in: a fifth of an evaluation student's CPU time here
went to the kernel (`benchmarks/bench_heap.py`). Training loops call
`keep_freed_heap()` first; scoring, whose memory the README sizes, keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import functools

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
HEAP_MMAP_BYTES = 256 << 20  # allocations below this come from the heap and are reused
HEAP_TRIM_BYTES = 1 << 30  # the heap gives memory back only when this much lies free on top


@functools.cache
def keep_freed_heap() -> bool:
    """Set this process's heap to keep and reuse freed memory (once per process); False where
    the C library has no glibc `mallopt` (macOS, Windows, musl), which keeps its own."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_BYTES)
    )
