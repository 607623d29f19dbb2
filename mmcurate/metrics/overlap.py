"""Overlap of selected subsets: intersection, union and Jaccard, on uids in any form."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np


def _as_set(subset: Iterable) -> set:
    """A subset as a set of hashable uids: hex strings, or (hi, lo) pairs of a (u8, u8) array."""
    if isinstance(subset, np.ndarray) and subset.dtype.names:
        a, b = subset.dtype.names[:2]
        return set(zip(subset[a].tolist(), subset[b].tolist()))
    if isinstance(subset, np.ndarray):
        return set(subset.tolist())
    return set(subset)


def overlap(a: Iterable, b: Iterable) -> dict[str, float]:
    """Sizes of a, b, their intersection and union, Jaccard, and the share of a that is in b."""
    sa, sb = _as_set(a), _as_set(b)
    inter, union = len(sa & sb), len(sa | sb)
    return {
        "a": len(sa),
        "b": len(sb),
        "intersection": inter,
        "union": union,
        "jaccard": inter / union if union else float("nan"),
        "a_in_b": inter / len(sa) if sa else float("nan"),
    }


def jaccard_matrix(subsets: Mapping[str, Iterable]) -> tuple[list[str], np.ndarray]:
    """Pairwise Jaccard of named subsets: (names, square matrix)."""
    names = list(subsets)
    sets = [_as_set(subsets[n]) for n in names]
    out = np.ones((len(names), len(names)))
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            union = len(sets[i] | sets[j])
            value = len(sets[i] & sets[j]) / union if union else float("nan")
            out[i, j] = out[j, i] = value
    return names, out


def top_fraction(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Row indices of the floor(fraction·n) highest scores (ties to the lower index)."""
    scores = np.asarray(scores)
    k = int(np.floor(fraction * len(scores)))
    order = np.lexsort((np.arange(len(scores)), -scores))
    return np.sort(order[:k])
