"""Subset files (SPEC §2): DataComp's sorted, unique `(u8, u8)` uid array plus a JSON record."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mmcurate.data.atomic import save_npy_atomic, write_json_atomic
from mmcurate.data.uid import UID_DTYPE, make_pairs, sort_unique_pairs
from mmcurate.errors import UsageError


def load_subset(path: str | os.PathLike) -> np.ndarray:
    """A subset file as sorted unique (u8, u8) pairs; never unpickles, validates the dtype."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"subset file not found: {p}")
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise UsageError(f"unreadable subset file {p}: {str(exc).splitlines()[0]}") from None
    names = getattr(arr, "dtype", np.dtype("O")).names
    if (
        not isinstance(arr, np.ndarray)
        or arr.ndim != 1
        or names is None
        or len(names) != 2
        or any(arr.dtype[n].kind != "u" or arr.dtype[n].itemsize != 8 for n in names)
    ):
        kind = type(arr).__name__ if not isinstance(arr, np.ndarray) else f"{arr.dtype} {arr.shape}"
        raise UsageError(f"{p} is not a subset file: need a 1-d (u8, u8) array, got {kind}")
    return sort_unique_pairs(make_pairs(arr[names[0]], arr[names[1]]))


def record_path(subset_path: str | os.PathLike) -> Path:
    """The JSON record written beside a subset file."""
    return Path(subset_path).with_suffix(".json")


def write_subset(out: str | os.PathLike, subset: np.ndarray, report: dict) -> Path:
    """Save subset.npy and, beside it, its subset.json record; returns the json path."""
    out = Path(out)
    if subset.dtype != UID_DTYPE:
        raise ValueError(f"subset dtype must be {UID_DTYPE}, got {subset.dtype}")
    save_npy_atomic(out, subset)
    record = record_path(out)
    write_json_atomic(record, {**report, "subset": str(out)})
    return record
