"""Atomic writes: every output goes to a temporary name in its directory, then is renamed."""

from __future__ import annotations

import errno
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from mmcurate.errors import ShardError

_UMASK = os.umask(0)
os.umask(_UMASK)


DISK_FULL = {
    errno.ENOSPC: "no space left on device",
    errno.EFBIG: "file too large (the file size limit, ulimit -f)",
    errno.EDQUOT: "disk quota exceeded",
}


class DiskFullError(ShardError):
    """A write failed for lack of space: the item fails, naming the file and the cause."""


def disk_full(path: str | os.PathLike, exc: BaseException) -> DiskFullError | None:
    """The one-line error for a write to `path` that ran out of space, or None for any other."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            code = seen.errno  # pyarrow's OSErrors carry the errno only in their text
            code = code or next((c for c in DISK_FULL if os.strerror(c) in str(seen)), None)
            if code in DISK_FULL:
                return DiskFullError(f"{path}: {DISK_FULL[code]}")
        seen = seen.__cause__ or seen.__context__
    return None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds.

    A full disk (or file size limit) fails with DiskFullError naming `path`; the temporary file
    is removed whatever happens, so nothing under a final name is ever truncated."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, final)
    except Exception as exc:
        full = disk_full(final, exc)
        if full is None:
            raise
        raise full from None
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes under their final name only once complete."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write a JSON document atomically (sorted keys, so equal content gives equal bytes)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json_dict(path: str | os.PathLike) -> dict | None:
    """The JSON object in a file, or None when it is missing, unreadable or not an object: how
    every marker and manifest is read, so a damaged one means "redo", never a crash."""
    try:
        data = json.loads(Path(path).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def save_npz_atomic(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Save an uncompressed npz atomically; fixed zip timestamps make equal data equal bytes."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(array), allow_pickle=False)


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save one array as .npy atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def write_parquet_atomic(path: str | os.PathLike, table: Any) -> None:
    """Write a pyarrow Table as parquet atomically."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save atomically, so a kill never leaves a truncated checkpoint; the same object
    gives the same bytes under any name (torch names the archive inside after a path, so the
    temporary name is kept out by saving through a file object)."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
