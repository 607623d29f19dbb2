"""Writing webdataset shards: `webdataset.TarWriter` with fixed metadata, renamed into place.

Fixed mtime, owner and mode make equal samples give equal tar bytes, so a resumed run is
byte-identical to an uninterrupted one. TarWriter writes a sample's files sorted by extension.
A member name that could escape the directory the tar is unpacked to, or that webdataset would
read as another key, is refused (`UnsafeNameError`), so no writer here can produce one.

Beside a shard `NNNNN.tar`, `write_shard_metadata` writes what img2dataset writes beside each of
its shards: `NNNNN.parquet` (one row per sample: its metadata, status "success") and
`NNNNN_stats.json` (count, successes, failures). `sizes.json` maps shard file names to sample
counts, which open_clip's loader reads to know the dataset size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from mmcurate.data.atomic import atomic_path, write_json_atomic, write_parquet_atomic
from mmcurate.data.shards import is_safe_ext, is_safe_key, sample_fields

WriteSample = Callable[[str, Mapping[str, bytes]], None]


class UnsafeNameError(ValueError):
    """A sample key or extension that must never become a tar member name."""


def check_member_names(key: str, exts: Iterable[str]) -> None:
    """Raise UnsafeNameError unless every `key.ext` is a safe member name."""
    if not is_safe_key(key):
        raise UnsafeNameError(f"refusing to write the unsafe sample key {key!r}")
    for ext in exts:
        if not is_safe_ext(ext):
            raise UnsafeNameError(f"refusing to write the unsafe member name {key!r}.{ext!r}")


@contextmanager
def shard_writer(path: str | os.PathLike) -> Iterator[WriteSample]:
    """Yield `write(key, {ext: bytes})`; the tar appears under `path` only when the block ends."""
    from webdataset import TarWriter

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        writer = TarWriter(
            fh, user="", group="", mode=0o644, mtime=0, encoder=False, keep_meta=True
        )

        def write(key: str, files: Mapping[str, bytes]) -> None:
            check_member_names(key, files)
            writer.write({"__key__": key, **files})

        try:
            yield write
        finally:
            writer.close()


def write_shard(
    path: str | os.PathLike, samples: Iterable[tuple[str, Mapping[str, bytes]]]
) -> Path:
    """Write (key, {ext: bytes}) samples as one webdataset tar."""
    with shard_writer(path) as write:
        for key, files in samples:
            write(key, files)
    return Path(path)


SIZES = "sizes.json"
STATS_SUFFIX = "_stats.json"
SHARD_DIGITS = 5  # img2dataset's default --oom_shard_count
# img2dataset's parquet columns: the input columns (uid, caption, url), then what it adds.
_TEXT = ("uid", "caption", "url", "key", "status", "error_message")
_SIZES = ("width", "height", "original_width", "original_height")


def shard_name(index: int) -> str:
    """The zero-padded name of output shard `index`, as img2dataset names its shards."""
    return f"{index:0{SHARD_DIGITS}d}"


def metadata_row(key: str, uid: str, files: Mapping[str, bytes]) -> dict:
    """A written sample's img2dataset parquet row, from its own txt/json members."""
    fields = sample_fields(dict(files))
    meta = fields["json"] or {}
    row = {"uid": uid, "caption": fields["caption"], "url": fields["url"], "key": key}
    row.update(status="success", error_message=None)
    for name in _SIZES:
        value = meta.get(name)
        row[name] = value if isinstance(value, int) and not isinstance(value, bool) else None
    sha256 = meta.get("sha256")
    row["sha256"] = sha256 if isinstance(sha256, str) else None
    return row


def write_shard_metadata(out: str | os.PathLike, name: str, rows: list[dict]) -> None:
    """`<name>.parquet` and then `<name>_stats.json` beside the shard `<name>.tar`."""
    import pyarrow as pa

    schema = pa.schema(
        [
            *(pa.field(c, pa.string()) for c in _TEXT),
            *(pa.field(c, pa.int32()) for c in _SIZES),
            pa.field("sha256", pa.string()),
        ]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    write_parquet_atomic(Path(out) / f"{name}.parquet", table)
    count = len(rows)
    stats = {
        "count": count,
        "successes": count,
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "duration": 0.0,
        "start_time": 0.0,
        "end_time": 0.0,
        "status_dict": {"success": count} if count else {},
    }
    write_json_atomic(Path(out) / f"{name}{STATS_SUFFIX}", stats)


def write_sizes(out: str | os.PathLike, sizes: Mapping[str, int]) -> None:
    """`sizes.json`: shard file name -> sample count, as open_clip's get_dataset_size reads."""
    write_json_atomic(Path(out) / SIZES, dict(sizes))
