"""Overlap of two selected subsets: intersection, union and Jaccard."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from mmcurate.data.uid import intersect_pairs, sort_unique_pairs


def _is_pairs(subset: Iterable) -> bool:
    return isinstance(subset, np.ndarray) and subset.dtype.names is not None


def _as_set(subset: Iterable) -> set:
    return set(subset.tolist()) if isinstance(subset, np.ndarray) else set(subset)


def overlap(a: Iterable, b: Iterable) -> dict[str, float]:
    """Sizes of a, b, their intersection and union, Jaccard, and the share of a that is in b.

    Subset files' (u8, u8) uid arrays go through the vectorised set algebra of uid pairs, so
    subsets of tens of millions of uids compare without Python objects; other iterables of
    hashable uids (hex strings) go through sets.
    """
    if _is_pairs(a) and _is_pairs(b):
        size_a, size_b = len(sort_unique_pairs(a)), len(sort_unique_pairs(b))
        inter = len(intersect_pairs(a, b))
    else:
        sa, sb = _as_set(a), _as_set(b)
        size_a, size_b, inter = len(sa), len(sb), len(sa & sb)
    union = size_a + size_b - inter
    return {
        "a": size_a,
        "b": size_b,
        "intersection": inter,
        "union": union,
        "jaccard": inter / union if union else float("nan"),
        "a_in_b": inter / size_a if size_a else float("nan"),
    }
