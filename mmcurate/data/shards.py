"""Shard reading: sources -> shard URLs -> samples (key, uid, files, caption, json, image).

Every sample also says where its uid came from (`uid_source`: json, derived, or
malformed_uid when its json carried a uid that is not 32 hex digits), and flags a member name
that could escape the directory a tar is unpacked to, or that tar or webdataset would read
differently (`problem` = UNSAFE_NAME). Link members (symlinks, hard links, devices) are never
read; their extensions are listed in `links`.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmcurate.data.skips import MISSING_IMAGE, UNSAFE_NAME
from mmcurate.data.uid import uid_and_source
from mmcurate.errors import ShardError, UsageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
IMAGE_FILE_SUFFIXES = tuple(f".{e}" for e in IMAGE_EXTS)
# webdataset's split of a member name: the key ends at the first '.' of the last component.
_KEY_EXT = re.compile(r"((?:.*/|)[^./]+)\.([^/]*)", re.DOTALL)
# Control characters end or split names in tar and log lines; a backslash is a separator on
# Windows, where `..\x` escapes the target directory.
_BAD_CHAR = re.compile(r"[\x00-\x1f\x7f\\]")
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


def is_safe_path(name: str) -> bool:
    """A relative path that stays inside the directory it is unpacked to: no empty, '.' or
    '..' component (so not absolute), no control character, no backslash."""
    if not name or _BAD_CHAR.search(name):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def is_safe_key(key: str) -> bool:
    """A sample key that is a safe path and that webdataset reads back as the same key (no
    '.' in its last component). Sub-directories such as `part1/00001` are fine."""
    return is_safe_path(key) and "." not in key.rsplit("/", 1)[-1]


def is_safe_ext(ext: str) -> bool:
    """A member extension that keeps `key.ext` one safe member name."""
    return bool(ext) and "/" not in ext and not _BAD_CHAR.search(ext)


def sample_fields(files: dict[str, bytes]) -> dict:
    """What a sample's files say (extensions in any case): caption (the txt member, else the
    json's caption), json metadata (a dict, or None), image bytes and extension, url."""
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
    url = (meta or {}).get("url")
    return {
        "caption": caption,
        "json": meta,
        "image": lower[image_ext] if image_ext else None,
        "image_ext": image_ext,
        "url": url if isinstance(url, str) else None,
    }


def _finish_sample(
    stem: str, key: str, files: dict[str, bytes], links: tuple[str, ...] = ()
) -> dict:
    fields = sample_fields(files)
    uid, source = uid_and_source(stem, key, fields["json"])
    safe = is_safe_key(key) and all(is_safe_ext(e) for e in (*files, *links))
    return {
        "key": key,
        "uid": uid,
        "uid_source": source,
        "files": files,
        **fields,
        "links": links,
        "problem": None if safe else UNSAFE_NAME,
    }


def copy_problem(sample: dict) -> str | None:
    """Why a sample cannot be copied as it is into a new shard: an unsafe name, or a link
    member (counted as a missing image when it stood in for the image, as embed counts it)."""
    if sample["problem"]:
        return sample["problem"]
    if any(ext.lower() in IMAGE_EXTS for ext in sample["links"]):
        return MISSING_IMAGE
    return UNSAFE_NAME if sample["links"] else None


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
        key, files, links, exts, end = None, {}, [], set(), 0
        try:
            for member in tar:
                end = member.offset_data + -(-member.size // _BLOCK) * _BLOCK
                if member.isdir():
                    continue
                match = _KEY_EXT.fullmatch(_clean_name(member.name))
                if not match:
                    continue
                mkey, ext = match.group(1), match.group(2)
                data = tar.extractfile(member).read() if member.isfile() else None
                if data is not None and len(data) != member.size:
                    raise ShardError(f"{stem}: truncated tar (member {member.name} cut short)")
                if key is not None and (mkey != key or ext.lower() in exts):
                    yield _finish_sample(stem, key, files, tuple(links))
                    files, links, exts = {}, [], set()
                key = mkey
                if data is None:
                    links.append(ext)
                else:
                    files[ext] = data
                exts.add(ext.lower())
        except tarfile.TarError as exc:
            raise ShardError(f"{stem}: corrupt tar ({exc})") from None
        except OSError as exc:
            raise ShardError(f"{stem}: read error ({exc})") from None
        _check_end_marker(fh, end, stem)
        if key is not None:
            yield _finish_sample(stem, key, files, tuple(links))


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
        sample = _finish_sample(stem, rel, {ext: data})
        yield {**sample, "problem": None if is_safe_path(rel) else UNSAFE_NAME}


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
