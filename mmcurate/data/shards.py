"""Shard reading: sources -> shard URLs -> samples (key, uid, files, caption, json, image)."""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from mmcurate.data.uid import sample_uid
from mmcurate.errors import ShardError, UsageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
IMAGE_FILE_SUFFIXES = tuple(f".{e}" for e in IMAGE_EXTS)
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_BLOCK = 512


def _is_url(src: str) -> bool:
    return "://" in src and not src.startswith("file://")


def expand_sources(sources: Sequence[str]) -> list[str]:
    """Expand brace patterns and globs into shard URLs; a directory is kept as an image folder."""
    from braceexpand import braceexpand

    out: list[str] = []
    for src in sources:
        for item in braceexpand(str(src)):
            if _is_url(item):
                out.append(item)
            elif os.path.isdir(item):
                out.append(item)
            elif glob.has_magic(item):
                out.extend(sorted(glob.glob(item)))
            elif os.path.exists(item.removeprefix("file://")):
                out.append(item.removeprefix("file://"))
            else:
                raise UsageError(f"source not found: {item}")
    if not out:
        raise UsageError(f"no shards match {' '.join(map(str, sources))}")
    return out


def shard_stem(url: str) -> str:
    """A shard's file name without `.tar` (a folder's name for an image folder)."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(".tar")] if name.endswith(".tar") else name


def check_unique_stems(urls: Sequence[str]) -> list[str]:
    """Stems of the URLs; refused up front when two shards share a stem."""
    stems = [shard_stem(u) for u in urls]
    seen: dict[str, str] = {}
    for stem, url in zip(stems, urls):
        if stem in seen:
            raise UsageError(f"two shards have the same stem {stem!r}: {seen[stem]} and {url}")
        seen[stem] = url
    return stems


def _open(url: str):
    if _is_url(url):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb")


def _decode_text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _finish_sample(stem: str, key: str, files: dict[str, bytes]) -> dict:
    meta = None
    if "json" in files:
        try:
            loaded = json.loads(_decode_text(files["json"]))
            meta = loaded if isinstance(loaded, dict) else None
        except ValueError:
            meta = None
    caption = None
    if "txt" in files:
        caption = _decode_text(files["txt"])
    elif meta is not None and isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    image_ext = next((e for e in IMAGE_EXTS if e in files), None)
    return {
        "key": key,
        "uid": sample_uid(stem, key, meta),
        "files": files,
        "caption": caption,
        "json": meta,
        "image": files[image_ext] if image_ext else None,
        "image_ext": image_ext,
        "url": (meta or {}).get("url") if isinstance((meta or {}).get("url"), str) else None,
    }


def _check_end_marker(fh, end: int, stem: str) -> None:
    """Tar readers stop silently at a cut header; require the two zero end-of-archive blocks."""
    fh.seek(end)
    tail = fh.read(2 * _BLOCK)
    if len(tail) < 2 * _BLOCK or tail.count(0) != len(tail):
        raise ShardError(f"{stem}: truncated tar (no end-of-archive marker after byte {end})")


def _iter_tar(url: str, stem: str) -> Iterator[dict]:
    try:
        fh = _open(url)
    except OSError as exc:
        raise ShardError(f"{stem}: cannot open {url}: {exc}") from None
    with fh:
        try:
            tar = tarfile.open(fileobj=fh, mode="r:")
        except tarfile.TarError as exc:
            raise ShardError(f"{stem}: not a readable tar ({exc})") from None
        key, files, end = None, {}, 0
        try:
            for member in tar:
                if not member.isfile():
                    continue
                end = member.offset_data + -(-member.size // _BLOCK) * _BLOCK
                match = _KEY_EXT.match(member.name)
                if not match:
                    continue
                mkey, ext = match.group(1), match.group(2).lower()
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise ShardError(f"{stem}: truncated tar (member {member.name} cut short)")
                if mkey != key and key is not None:
                    yield _finish_sample(stem, key, files)
                    files = {}
                key = mkey
                files[ext] = data
        except tarfile.TarError as exc:
            raise ShardError(f"{stem}: corrupt tar ({exc})") from None
        except OSError as exc:
            raise ShardError(f"{stem}: read error ({exc})") from None
        if key is not None:
            _check_end_marker(fh, end, stem)
            yield _finish_sample(stem, key, files)
        else:
            _check_end_marker(fh, 0, stem)


def _iter_folder(root: str, stem: str) -> Iterator[dict]:
    base = Path(root)
    paths = sorted(p for p in base.rglob("*") if p.suffix.lower() in IMAGE_FILE_SUFFIXES)
    for path in paths:
        rel = path.relative_to(base).as_posix()
        ext = path.suffix.lower().lstrip(".")
        files = {ext: path.read_bytes()}
        yield {**_finish_sample(stem, rel, files), "key": rel}


def iter_samples(url: str) -> Iterator[dict]:
    """Samples of one shard (or image folder), in order; a broken tar raises ShardError."""
    stem = shard_stem(url)
    if not _is_url(url) and os.path.isdir(url):
        yield from _iter_folder(url, stem)
    else:
        yield from _iter_tar(url, stem)
