"""Writing webdataset shards: `webdataset.TarWriter` with fixed metadata, renamed into place.

Fixed mtime, owner and mode make equal samples give equal tar bytes, so a resumed run is
byte-identical to an uninterrupted one. TarWriter writes a sample's files sorted by extension.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from mmcurate.data.atomic import atomic_path

WriteSample = Callable[[str, Mapping[str, bytes]], None]


@contextmanager
def shard_writer(path: str | os.PathLike) -> Iterator[WriteSample]:
    """Yield `write(key, {ext: bytes})`; the tar appears under `path` only when the block ends."""
    from webdataset import TarWriter

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        writer = TarWriter(
            fh, user="", group="", mode=0o644, mtime=0, encoder=False, keep_meta=True
        )
        try:
            yield lambda key, files: writer.write({"__key__": key, **files})
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
