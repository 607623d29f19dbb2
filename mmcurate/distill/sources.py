"""Reading real pairs for distillation: Karpathy-split JSON or webdataset shards, decoded to
square uint8 images before their captions are encoded."""

from __future__ import annotations

import io
import json
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from mmcurate.data.shards import expand_sources, iter_samples, shard_stem
from mmcurate.data.skips import (
    BROKEN_SHARD,
    DUPLICATE_UID,
    MISSING_CAPTION,
    MISSING_IMAGE,
    UNDECODABLE_IMAGE,
)
from mmcurate.data.uid import sample_uid
from mmcurate.errors import ShardError, UsageError
from mmcurate.progress import progress_bar


class ImageSink(Protocol):
    """Where decoded images go, one row each (the data cache's memory-mapped .npy)."""

    count: int

    def append(self, row: np.ndarray) -> int: ...

    def rollback(self, count: int) -> None: ...


def resize_square(im, size: int, mode: str) -> np.ndarray:
    """An RGB size×size uint8 HWC image: `squash` resizes both sides (the reference's
    Resize((s, s)), bicubic); `crop` resizes the shorter side and centre-crops."""
    from PIL import Image

    im = im.convert("RGB")
    if mode == "squash":
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8)
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def decode_bytes(data: bytes, size: int, mode: str) -> np.ndarray:
    """Decode image bytes fully and bring them to size×size."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return resize_square(im, size, mode)


def _decode_file(path: Path, size: int, mode: str) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return resize_square(im, size, mode)
    except Exception:
        return None


@dataclass
class RawPairs:
    """Pairs read from a source before text encoding (their images went to a sink)."""

    image_index: list[int]
    captions: list[str]
    uids: list[str]
    keys: list[str]
    urls: list[str | None]
    shards: list[str]
    skipped: Counter


def _empty() -> RawPairs:
    return RawPairs([], [], [], [], [], [], Counter())


def is_json(data: str) -> bool:
    return data.endswith(".json") and os.path.isfile(data)


def _image_root(json_path: Path, entries: list[dict], image_root: str | None) -> Path:
    """Where the JSON's relative image paths live: --image-root, or the JSON's dir or parent."""
    if image_root:
        root = Path(image_root)
        if not root.is_dir():
            raise UsageError(f"image root not found: {root}")
        return root
    first = str(entries[0]["image"])
    for root in (json_path.parent, json_path.parent.parent):
        if (root / first).is_file():
            return root
    raise UsageError(
        f"cannot find image {first!r} of {json_path.name} next to it or in its parent "
        "directory; pass --image-root DIR"
    )


def _read_json_entries(path: Path) -> list[dict]:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read Karpathy-split JSON {path}: {exc}") from None
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{path}: expected a non-empty list of {{image, caption}} entries")
    for entry in entries[:1]:
        if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
            raise UsageError(f"{path}: entries need 'image' and 'caption' fields")
    return entries


def json_image_names(path: Path) -> list[str]:
    """The distinct images of a Karpathy JSON, in first-seen order (the cache's capacity)."""
    return list(dict.fromkeys(str(e["image"]) for e in _read_json_entries(path)))


def _decoded_in_order(root: Path, names: list[str], size: int, mode: str, desc: str):
    """Decoded images of `names` in order, at most 64 in flight (memory stays bounded)."""
    window = 64
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        bar = progress_bar(total=len(names), desc=desc, unit="img")
        for start in range(0, len(names), window):
            chunk = names[start : start + window]
            yield from pool.map(lambda n: _decode_file(root / n, size, mode), chunk)
            bar.update(len(chunk))
        bar.close()


def read_json(
    path: Path, size: int, image_root: str | None, mode: str, sink: ImageSink
) -> RawPairs:
    """Karpathy JSON: train entries hold one caption, val/test entries a list of captions."""
    entries = _read_json_entries(path)
    root = _image_root(path, entries, image_root)
    order: dict[str, list[tuple[str, int]]] = {}
    for entry in entries:
        caps = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        slot = order.setdefault(str(entry["image"]), [])
        base = len(slot)
        slot.extend((str(c), base + j) for j, c in enumerate(caps))
    names = list(order)
    raw = _empty()
    decoded = _decoded_in_order(root, names, size, mode, f"decode {path.name}")
    for name, pixels in zip(names, decoded, strict=True):
        if pixels is None:
            raw.skipped[UNDECODABLE_IMAGE] += len(order[name])
            continue
        kept = [(c, j) for c, j in order[name] if c.strip()]
        if len(kept) < len(order[name]):
            raw.skipped[MISSING_CAPTION] += len(order[name]) - len(kept)
        if not kept:
            continue
        row = sink.append(pixels)
        for caption, j in kept:
            key = f"{name}#{j}"
            raw.image_index.append(row)
            raw.captions.append(caption)
            raw.keys.append(key)
            raw.uids.append(sample_uid(path.stem, key))
            raw.urls.append(None)
            raw.shards.append(path.stem)
    return raw


def read_shards(urls: Sequence[str], size: int, mode: str, sink: ImageSink) -> RawPairs:
    """webdataset shards: one pair per sample; a broken shard is left out with a warning."""
    raw = _empty()
    for url in progress_bar(urls, desc="read shards", unit="shard"):
        stem = shard_stem(url)
        rows: list[tuple] = []
        seen: set[str] = set()
        first = sink.count
        try:
            for sample in iter_samples(url):
                caption = (sample["caption"] or "").strip()
                if not sample["image"]:
                    raw.skipped[MISSING_IMAGE] += 1
                    continue
                if not caption:
                    raw.skipped[MISSING_CAPTION] += 1
                    continue
                if sample["uid"] in seen:
                    raw.skipped[DUPLICATE_UID] += 1
                    continue
                try:
                    pixels = decode_bytes(sample["image"], size, mode)
                except Exception:
                    raw.skipped[UNDECODABLE_IMAGE] += 1
                    continue
                seen.add(sample["uid"])
                row = sink.append(pixels)
                rows.append((row, caption, sample["uid"], sample["key"], sample["url"]))
        except ShardError as exc:
            warnings.warn(f"shard left out: {exc}", stacklevel=2)
            raw.skipped[BROKEN_SHARD] += 1
            sink.rollback(first)
            continue
        for row, caption, uid, key, url_field in rows:
            raw.image_index.append(row)
            raw.captions.append(caption)
            raw.uids.append(uid)
            raw.keys.append(key)
            raw.urls.append(url_field)
            raw.shards.append(stem)
    return raw


def shard_urls(data: str) -> list[str]:
    """Shard URLs of DATA: a directory of .tar files, a glob, a brace pattern or a URL."""
    if os.path.isdir(data):
        tars = sorted(str(p) for p in Path(data).glob("*.tar"))
        if not tars:
            raise UsageError(f"no .tar shards in directory {data}")
        return tars
    return expand_sources([data])


def absolute_data(data: str) -> str:
    """A local DATA path made absolute, so artifacts can find it again; URLs stay as given."""
    return data if "://" in data or not Path(data).exists() else str(Path(data).resolve())
