"""uid rules of SPEC §2 (32 hex chars, DataComp's (u8, u8) pair form) and set algebra on pairs.

Pair arrays are sorted with lexsort, which is faster than sorting the structured array itself.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmcurate.data.skips import MALFORMED_UID

UID_DTYPE = np.dtype("u8,u8")
UID_FROM_JSON = "json"
UID_DERIVED = "derived"
UID_SOURCES = (UID_FROM_JSON, UID_DERIVED, MALFORMED_UID)
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX_LUT = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_LUT[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_LUT[_c] = 10 + _i


def uid_and_source(stem: str, key: str, meta: dict | None = None) -> tuple[str, str]:
    """The sample's uid and where it came from: json["uid"] when it is 32 hex digits (any
    case, lowercased), else md5 of "stem/key" ("derived"), flagged MALFORMED_UID when the
    json carried a uid that is not 32 hex digits."""
    given = (meta or {}).get("uid")
    if given is not None:
        if isinstance(given, str) and _HEX32.match(given.lower()):
            return given.lower(), UID_FROM_JSON
        return derived_uid(stem, key), MALFORMED_UID
    return derived_uid(stem, key), UID_DERIVED


def derived_uid(stem: str, key: str) -> str:
    """The uid of a sample without one in its json: md5 of "stem/key"."""
    return hashlib.md5(f"{stem}/{key}".encode()).hexdigest()


def sample_uid(stem: str, key: str, meta: dict | None = None) -> str:
    """The sample's uid: json["uid"] when it is 32 hex digits, else md5 of "stem/key"."""
    return uid_and_source(stem, key, meta)[0]


def uid_pairs(uids: Sequence[str]) -> np.ndarray:
    """uids as a structured (u8, u8) array in order, the form DataComp subset files hold."""
    out = np.empty(len(uids), dtype=UID_DTYPE)
    out["f0"] = [int(u[:16], 16) for u in uids]
    out["f1"] = [int(u[16:32], 16) for u in uids]
    return out


def pair_to_uid(hi: int, lo: int) -> str:
    """Inverse of the pair form: 32 lowercase hex characters."""
    return f"{int(hi):016x}{int(lo):016x}"


def uid_examples(pairs: np.ndarray, limit: int = 5) -> list[str]:
    """A few uids in their hex form, for summaries."""
    return [pair_to_uid(int(p["f0"]), int(p["f1"])) for p in pairs[:limit]]


def make_pairs(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """A (u8, u8) array from its two halves."""
    out = np.empty(len(hi), dtype=UID_DTYPE)
    out["f0"] = hi
    out["f1"] = lo
    return out


def pair_order(pairs: np.ndarray) -> np.ndarray:
    """The permutation that sorts a pair array."""
    return np.lexsort((pairs["f1"], pairs["f0"]))


def _starts(sorted_pairs: np.ndarray) -> np.ndarray:
    """True where a sorted array holds a value different from the one before."""
    new = np.ones(len(sorted_pairs), dtype=bool)
    if len(sorted_pairs) > 1:
        hi, lo = sorted_pairs["f0"], sorted_pairs["f1"]
        new[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    return new


def sort_unique_pairs(pairs: np.ndarray) -> np.ndarray:
    """Sorted, duplicate-free copy of a (u8, u8) array, as subset files must be."""
    s = pairs[pair_order(pairs)]
    return make_pairs(s["f0"], s["f1"])[_starts(s)]


def first_occurrence(pairs: np.ndarray) -> np.ndarray:
    """Mask of the rows holding the first occurrence of their uid."""
    order = pair_order(pairs)
    mask = np.zeros(len(pairs), dtype=bool)
    mask[order[_starts(pairs[order])]] = True
    return mask


def member_mask(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For unique arrays a and b: which elements of a are in b."""
    both = np.concatenate([make_pairs(a["f0"], a["f1"]), make_pairs(b["f0"], b["f1"])])
    order = pair_order(both)
    s = both[order]
    twin = np.zeros(len(s), dtype=bool)
    if len(s) > 1:
        twin[:-1] = ~_starts(s)[1:]
    from_a = order < len(a)
    mask = np.zeros(len(a), dtype=bool)
    mask[order[from_a]] = twin[from_a]
    return mask


def union_pairs(*arrays: np.ndarray) -> np.ndarray:
    """Sorted unique union of subsets."""
    parts = [make_pairs(a["f0"], a["f1"]) for a in arrays]
    return sort_unique_pairs(np.concatenate(parts) if parts else np.empty(0, UID_DTYPE))


def intersect_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted intersection of two subsets."""
    a = sort_unique_pairs(a)
    return a[member_mask(a, sort_unique_pairs(b))]


def difference_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted elements of a that are not in b."""
    a = sort_unique_pairs(a)
    return a[~member_mask(a, sort_unique_pairs(b))]


def hex_to_pairs(column: Any) -> np.ndarray:
    """A pyarrow column of 32-hex-char uids as (u8, u8) pairs, parsed without Python objects."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        raise ValueError(f"uid column has type {arr.type}, expected strings")
    if arr.null_count:
        raise ValueError(f"{arr.null_count} null uid(s)")
    n = len(arr)
    if n == 0:
        return np.empty(0, dtype=UID_DTYPE)
    off_type = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=off_type)[arr.offset : arr.offset + n + 1]
    if not np.all(np.diff(offsets) == 32):
        raise ValueError("uids must be 32 hex characters")
    raw = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    nibbles = _HEX_LUT[raw].reshape(n, 32)
    if (nibbles == 255).any():
        raise ValueError("uids must be 32 hex characters")
    packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
    big_endian = np.ascontiguousarray(packed).view(">u8")
    return make_pairs(big_endian[:, 0], big_endian[:, 1])
