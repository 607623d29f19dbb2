"""Which rows of a store stem get scores: a uid, finite embeddings, the first of a repeated uid.

Every score that writes a sidecar column uses this rule, so all columns cover the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmcurate.data.skips import DUPLICATE_UID, MISSING_UID, NONFINITE_EMBEDDING

SCAN_BLOCK = 65536


def valid_rows(uids: list, arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, dict[str, int]]:
    """Row indices to score, and the skipped rows counted by reason (one reason per row)."""
    n = len(uids)
    finite = np.ones(n, dtype=bool)
    for arr in arrays:
        for r0 in range(0, n, SCAN_BLOCK):
            block = np.asarray(arr[r0 : r0 + SCAN_BLOCK])
            finite[r0 : r0 + SCAN_BLOCK] &= np.isfinite(block).all(axis=1)
    missing = np.array([u is None or u == "" for u in uids], dtype=bool)
    seen: set = set()
    duplicate = np.zeros(n, dtype=bool)
    for i, u in enumerate(uids):
        if missing[i] or not finite[i]:
            continue
        if u in seen:
            duplicate[i] = True
        seen.add(u)
    skipped = {
        MISSING_UID: int(missing.sum()),
        NONFINITE_EMBEDDING: int((~missing & ~finite).sum()),
        DUPLICATE_UID: int(duplicate.sum()),
    }
    valid = np.flatnonzero(~missing & finite & ~duplicate)
    return valid, {k: v for k, v in skipped.items() if v}
