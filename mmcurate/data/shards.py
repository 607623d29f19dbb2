"""Shard reading: sources -> shard URLs -> samples (key, uid, files, caption, json, image)."""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmcurate.data.uid import sample_uid
from mmcurate.errors import ShardError, UsageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
IMAGE_FILE_SUFFIXES = tuple(f".{e}" for e in IMAGE_EXTS)
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_BLOCK = 512


@dataclass(frozen=True)
class ShardItem:
    """A per-shard work item: the shard's stem and where to read it."""

    name: str
    url: str


def _is_url(src: str) -> bool:
    return "://" in src and not src.startswith("file://")


def expand_sources(sources: Sequence[str]) -> list[str]:
    """Expand braces and globs into absolute shard paths or URLs; a directory is an image folder."""
    from braceexpand import braceexpand

    out: list[str] = []
    for src in sources:
        for item in braceexpand(str(src)):
            local = item.removeprefix("file://")
            if _is_url(item):
                out.append(item)
            elif os.path.isdir(local) or (not glob.has_magic(local) and os.path.exists(local)):
                out.append(os.path.abspath(local))
            elif glob.has_magic(local):
                out.extend(os.path.abspath(p) for p in sorted(glob.glob(local)))
            else:
                raise UsageError(f"source not found: {item}")
    if not out:
        raise UsageError(f"no shards match {' '.join(map(str, sources))}")
    return out


def shard_stem(url: str) -> str:
    """A shard's file name without `.tar` (a folder's name for an image folder)."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(".tar")] if name.endswith(".tar") else name


def shard_items(sources: Sequence[str]) -> list[ShardItem]:
    """One work item per shard of the sources, refused up front when two share a stem."""
    urls = expand_sources(sources)
    return [ShardItem(stem, url) for stem, url in zip(check_unique_stems(urls), urls)]


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


def _clean_name(name: str) -> str:
    """A member or file name with undecodable bytes replaced, so it encodes as UTF-8."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _finish_sample(stem: str, key: str, files: dict[str, bytes]) -> dict:
    lower = {ext.lower(): data for ext, data in files.items()}
    meta = None
    if "json" in lower:
        try:
            loaded = json.loads(_decode_text(lower["json"]))
            meta = loaded if isinstance(loaded, dict) else None
        except (ValueError, RecursionError):
            meta = None
    caption = None
    if "txt" in lower:
        caption = _decode_text(lower["txt"])
    elif meta is not None and isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    image_ext = next((e for e in IMAGE_EXTS if e in lower), None)
    return {
        "key": key,
        "uid": sample_uid(stem, key, meta),
        "files": files,
        "caption": caption,
        "json": meta,
        "image": lower[image_ext] if image_ext else None,
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
        key, files, exts, end = None, {}, set(), 0
        try:
            for member in tar:
                end = member.offset_data + -(-member.size // _BLOCK) * _BLOCK
                if not member.isfile():
                    continue
                match = _KEY_EXT.match(_clean_name(member.name))
                if not match:
                    continue
                mkey, ext = match.group(1), match.group(2)
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise ShardError(f"{stem}: truncated tar (member {member.name} cut short)")
                if key is not None and (mkey != key or ext.lower() in exts):
                    yield _finish_sample(stem, key, files)
                    files, exts = {}, set()
                key = mkey
                files[ext] = data
                exts.add(ext.lower())
        except tarfile.TarError as exc:
            raise ShardError(f"{stem}: corrupt tar ({exc})") from None
        except OSError as exc:
            raise ShardError(f"{stem}: read error ({exc})") from None
        _check_end_marker(fh, end, stem)
        if key is not None:
            yield _finish_sample(stem, key, files)


def _iter_folder(root: str, stem: str) -> Iterator[dict]:
    base = Path(root)
    paths = sorted(
        p for p in base.rglob("*") if p.suffix.lower() in IMAGE_FILE_SUFFIXES and not p.is_dir()
    )
    for path in paths:
        rel = _clean_name(path.relative_to(base).as_posix())
        ext = path.suffix.lstrip(".")
        try:
            data = path.read_bytes()
        except OSError:
            data = b""
        yield {**_finish_sample(stem, rel, {ext: data}), "key": rel}


def iter_samples(url: str) -> Iterator[dict]:
    """Samples of one shard (or image folder), in order; a broken tar raises ShardError.

    A sample is a run of members sharing a key; an extension repeated within the run (in any
    case) starts a new sample with the same key, so a duplicate is counted, never merged.
    """
    stem = shard_stem(url)
    if not _is_url(url) and os.path.isdir(url):
        yield from _iter_folder(url, stem)
    else:
        yield from _iter_tar(url, stem)
