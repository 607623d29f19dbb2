"""The embedding store: per-stem `<stem>.parquet` + `<stem>.npz`, finished by `<stem>.done.json`."""

from __future__ import annotations

import math
import os
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmcurate.data.atomic import (
    read_json_dict,
    save_npz_atomic,
    write_json_atomic,
    write_parquet_atomic,
)
from mmcurate.data.markers import FILES, check_stem_file, sizes_ok, vouch
from mmcurate.errors import ShardError, UsageError

DONE_SUFFIX = ".done.json"
META_COLUMNS = ("uid", "key", "caption", "url", "shard")
IMG_KEY, TXT_KEY = "img", "txt"  # as `mmcurate embed` writes them
KEY_FAMILIES = ((IMG_KEY, TXT_KEY), ("l14_img", "l14_txt"), ("b32_img", "b32_txt"))


def done_path(out_dir: str | os.PathLike, stem: str) -> Path:
    """Where a stem's completion marker lives."""
    return Path(out_dir) / f"{stem}{DONE_SUFFIX}"


def read_done(out_dir: str | os.PathLike, stem: str) -> dict | None:
    """A stem's done marker, or None when absent, unreadable or not a marker (then it is redone)."""
    data = read_json_dict(done_path(out_dir, stem))
    if data is None:
        return None
    rows = data.get("rows")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        return None
    return data


def is_done(out_dir: str | os.PathLike, stem: str) -> bool:
    """True when the stem finished in an earlier run and its files still have their sizes."""
    marker = read_done(out_dir, stem)
    return marker is not None and sizes_ok(marker, out_dir)


def write_stem(
    store_dir: str | os.PathLike,
    stem: str,
    meta: Any,
    arrays: dict[str, np.ndarray],
    stats: dict,
) -> None:
    """Write one stem: parquet and npz first, the done marker last, each atomically."""
    rows = meta.num_rows
    for name, arr in arrays.items():
        if len(arr) != rows:
            raise ShardError(f"{stem}: array {name!r} has {len(arr)} rows, metadata has {rows}")
    parquet, npz = Path(store_dir) / f"{stem}.parquet", Path(store_dir) / f"{stem}.npz"
    write_parquet_atomic(parquet, meta)
    save_npz_atomic(npz, arrays)
    files = vouch([parquet, npz], store_dir)
    write_json_atomic(done_path(store_dir, stem), {**stats, "rows": rows, FILES: files})


def _store_stems(store_dir: Path) -> list[str]:
    names = sorted(p.name for p in store_dir.iterdir() if p.name.endswith(".parquet"))
    return [n[: -len(".parquet")] for n in names if not n.endswith(".scores.parquet")]


def finished_stems(store_dir: str | os.PathLike) -> list[str]:
    """Stems readable from a store; a DataComp directory (no done markers) is taken whole."""
    root = Path(store_dir)
    if not root.is_dir():
        raise UsageError(f"store directory not found: {root}")
    stems = _store_stems(root)
    if not any(root.glob(f"*{DONE_SUFFIX}")):
        return stems
    finished = [s for s in stems if read_done(root, s) is not None]  # sizes: checked on open
    unfinished = sorted(set(stems) - set(finished))
    if unfinished:
        warnings.warn(
            f"{len(unfinished)} unfinished stem(s) left out of {root}: {', '.join(unfinished[:5])}"
            + (" ..." if len(unfinished) > 5 else ""),
            stacklevel=2,
        )
    return finished


def read_meta(store_dir: str | os.PathLike, stem: str, columns: Sequence[str] | None = None):
    """A stem's parquet metadata as a pyarrow Table (`text` is read as `caption` for DataComp)."""
    import pyarrow.parquet as pq

    path = Path(store_dir) / f"{stem}.parquet"
    check_stem_file(store_dir, stem, path.name)
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise ShardError(f"{stem}: unreadable parquet {path.name}: {exc}") from None
    if "caption" not in table.column_names and "text" in table.column_names:
        table = table.rename_columns(["caption" if c == "text" else c for c in table.column_names])
    if "uid" not in table.column_names:
        raise ShardError(f"{stem}: parquet has no 'uid' column")
    if columns is not None:
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise ShardError(f"{stem}: parquet lacks column(s) {missing}")
        table = table.select(list(columns))
    return table


def _npz_member_memmap(path: Path, key: str) -> np.ndarray | None:
    """Memory-map an uncompressed npz member; None when it is compressed."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        name_len = int.from_bytes(local[26:28], "little")
        extra_len = int.from_bytes(local[28:30], "little")
        start = info.header_offset + 30 + name_len + extra_len
        fh.seek(start)
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        offset = fh.tell()
    if dtype.hasobject:
        raise ShardError(f"{path.name}: member {key!r} holds Python objects; refusing to unpickle")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    order = "F" if fortran else "C"
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)


def read_arrays(
    store_dir: str | os.PathLike, stem: str, keys: Sequence[str], rows: int | None = None
) -> dict[str, np.ndarray]:
    """Memory-mapped embedding arrays of a stem, checked against the parquet's row count."""
    path = Path(store_dir) / f"{stem}.npz"
    check_stem_file(store_dir, stem, path.name)
    out: dict[str, np.ndarray] = {}
    present = npz_keys(store_dir, stem)
    for key in keys:
        if key not in present:
            raise ShardError(f"{stem}: npz has no array {key!r} (it has {sorted(present)})")
        try:
            arr = _npz_member_memmap(path, key)
            if arr is None:
                with np.load(path, allow_pickle=False) as npz:
                    arr = npz[key]
        except ShardError:
            raise
        except Exception as exc:
            raise ShardError(f"{stem}: unreadable array {key!r} in {path.name}: {exc}") from None
        if arr.ndim != 2 or arr.dtype.kind != "f":
            raise ShardError(
                f"{stem}: array {key!r} must be a 2-d float matrix, got {arr.dtype} {arr.shape}"
            )
        if rows is not None and arr.shape[0] != rows:
            raise ShardError(
                f"{stem}: parquet has {rows} rows but npz array {key!r} has {arr.shape[0]}"
            )
        out[key] = arr
    return out


def read_stem(
    store_dir: str | os.PathLike,
    stem: str,
    keys: Sequence[str],
    columns: Sequence[str] | None = ("uid",),
):
    """A stem's metadata table and its row-aligned arrays (lengths checked)."""
    meta = read_meta(store_dir, stem, columns)
    return meta, read_arrays(store_dir, stem, keys, rows=meta.num_rows)


def store_logit_scale(store_dir: str | os.PathLike) -> float | None:
    """The encoder's logit_scale recorded by `mmcurate embed`: the first finite positive one."""
    for marker in sorted(Path(store_dir).glob(f"*{DONE_SUFFIX}")):
        stats = read_done(store_dir, marker.name[: -len(DONE_SUFFIX)])
        value = stats.get("logit_scale") if stats else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(value) and value > 0:
                return float(value)
    return None


def npz_keys(store_dir: str | os.PathLike, stem: str) -> list[str]:
    """The array names of a stem's npz, read from its zip directory."""
    path = Path(store_dir) / f"{stem}.npz"
    try:
        with zipfile.ZipFile(path) as zf:
            return sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
    except (OSError, zipfile.BadZipFile) as exc:
        raise ShardError(f"{stem}: unreadable npz {path.name}: {exc}") from None


def detect_keys(store_dir: str | os.PathLike, need_txt: bool = True) -> tuple[str, str | None]:
    """The npz keys of a store when none are given: `img`/`txt` when present, else the one
    DataComp family (`l14_*` or `b32_*`) it holds; several is a UsageError.

    The first stem whose npz holds a family decides. With none found the defaults stand, and
    every stem then fails on its own, naming the arrays it has.
    """
    present: set[str] = set()
    found: list[tuple[str, str]] = []
    for stem in finished_stems(store_dir):
        try:
            present = set(npz_keys(store_dir, stem))
        except ShardError:
            continue
        found = [
            (img, txt)
            for img, txt in KEY_FAMILIES
            if img in present and (txt in present or not need_txt)
        ]
        if found:
            break
    if found and found[0][0] == IMG_KEY:
        found = found[:1]
    if len(found) == 1:
        img, txt = found[0]
        return img, txt if txt in present else None
    if not found:
        return IMG_KEY, TXT_KEY if need_txt else None
    listed = ", ".join(f"{i}/{t}" for i, t in found)
    raise UsageError(
        f"store {store_dir} holds several embedding families ({listed}): "
        "choose one with --img-key/--txt-key"
    )
