"""Real pairs for distillation: Karpathy-split JSON or webdataset shards, cached once.

A `PairSet` holds the decoded images (uint8, one row per image), one row per caption with the
frozen text encoder's CLS features (`normalize=False`), and which image each caption belongs
to (Flickr30k/COCO have 5 captions per image). Loading writes a cache directory in the
embedding-store layout (`<stem>.parquet`, `<stem>.npz` with `txt_cls`, `<stem>.done.json`)
plus `<stem>.images.npy`, so captions are encoded and images decoded only once; expert
workers then memory-map the cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import string
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mmcurate.data.atomic import save_npy_atomic
from mmcurate.data.store import read_done, read_stem, write_stem
from mmcurate.data.uid import sample_uid
from mmcurate.errors import MmcurateError, ShardError, UsageError

MAX_CAPTION_WORDS = 30
TEXT_KEY = "txt_cls"
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def clean_caption(text: str, max_words: int = MAX_CAPTION_WORDS) -> str:
    """Lower-case, replace punctuation by spaces, cut to `max_words` words (SPEC §6)."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(words[:max_words])


@dataclass
class PairSet:
    """Image-caption pairs: images (n_images,H,W,3) uint8 and per-caption text features."""

    images: np.ndarray
    image_index: np.ndarray
    texts: torch.Tensor
    captions: list[str]
    uids: list[str]
    source: str = "memory"
    text_encoder: str = ""
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def n_pairs(self) -> int:
        """Number of captions (pairs)."""
        return len(self.captions)

    @property
    def n_images(self) -> int:
        """Number of distinct images."""
        return int(self.images.shape[0])

    @property
    def image_size(self) -> int:
        """Side of the square images."""
        return int(self.images.shape[1])

    @property
    def text_dim(self) -> int:
        """Dimension of the text-encoder features."""
        return int(self.texts.shape[1])

    def pixels(self, pair_idx: Sequence[int] | np.ndarray) -> torch.Tensor:
        """uint8 (k,H,W,3) images of the given pairs."""
        rows = self.image_index[np.asarray(pair_idx, dtype=np.int64)]
        return torch.from_numpy(np.ascontiguousarray(self.images[rows]))


def _resize_square(im, size: int) -> np.ndarray:
    """Resize the shorter side to `size` (bicubic) and centre-crop to a square; uint8 HWC."""
    from PIL import Image

    im = im.convert("RGB")
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def decode_bytes(data: bytes, size: int) -> np.ndarray:
    """Decode image bytes fully and bring them to size×size."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return _resize_square(im, size)


def _decode_file(path: Path, size: int) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return _resize_square(im, size)
    except Exception:
        return None


@dataclass
class _Raw:
    """Pairs read from a source before text encoding."""

    images: list[np.ndarray]
    image_index: list[int]
    captions: list[str]
    uids: list[str]
    keys: list[str]
    urls: list[str | None]
    shards: list[str]
    skipped: Counter


def _is_json(data: str) -> bool:
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


def _read_json(path: Path, size: int, image_root: str | None) -> _Raw:
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
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        decoded = list(
            tqdm(
                pool.map(lambda n: _decode_file(root / n, size), names),
                total=len(names),
                desc=f"decode {path.name}",
                unit="img",
            )
        )
    raw = _Raw([], [], [], [], [], [], [], Counter())
    for name, pixels in zip(names, decoded, strict=True):
        if pixels is None:
            raw.skipped["undecodable image"] += len(order[name])
            continue
        kept = [(c, j) for c, j in order[name] if c.strip()]
        if len(kept) < len(order[name]):
            raw.skipped["missing caption"] += len(order[name]) - len(kept)
        if not kept:
            continue
        for caption, j in kept:
            key = f"{name}#{j}"
            raw.image_index.append(len(raw.images))
            raw.captions.append(caption)
            raw.keys.append(key)
            raw.uids.append(sample_uid(path.stem, key))
            raw.urls.append(None)
            raw.shards.append(path.stem)
        raw.images.append(pixels)
    return raw


def _read_shards(urls: Sequence[str], size: int) -> _Raw:
    """webdataset shards: one pair per sample; a broken shard is left out with a warning."""
    from mmcurate.data.shards import iter_samples, shard_stem

    raw = _Raw([], [], [], [], [], [], [], Counter())
    for url in tqdm(urls, desc="read shards", unit="shard"):
        stem = shard_stem(url)
        rows: list[tuple] = []
        seen: set[str] = set()
        try:
            for sample in iter_samples(url):
                caption = (sample["caption"] or "").strip()
                if not sample["image"]:
                    raw.skipped["missing image"] += 1
                    continue
                if not caption:
                    raw.skipped["missing caption"] += 1
                    continue
                if sample["uid"] in seen:
                    raw.skipped["duplicate uid"] += 1
                    continue
                try:
                    pixels = decode_bytes(sample["image"], size)
                except Exception:
                    raw.skipped["undecodable image"] += 1
                    continue
                seen.add(sample["uid"])
                rows.append((pixels, caption, sample["uid"], sample["key"], sample["url"]))
        except ShardError as exc:
            warnings.warn(f"shard left out: {exc}", stacklevel=2)
            raw.skipped["broken shard"] += 1
            continue
        for pixels, caption, uid, key, url_field in rows:
            raw.image_index.append(len(raw.images))
            raw.images.append(pixels)
            raw.captions.append(caption)
            raw.uids.append(uid)
            raw.keys.append(key)
            raw.urls.append(url_field)
            raw.shards.append(stem)
    return raw


def encode_captions(encoder, captions: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Cleaned captions -> float32 (n, d) CLS features of the frozen text encoder."""
    cleaned = [clean_caption(c) for c in captions]
    chunks = []
    for start in tqdm(
        range(0, len(cleaned), batch_size), desc="encode captions", unit="batch", leave=False
    ):
        chunks.append(encoder.encode_texts(cleaned[start : start + batch_size], normalize=False))
    if not chunks:
        return torch.zeros(0, int(encoder.dim))
    return torch.cat(chunks).float()


def load_text_encoder(spec: str, device: str = "auto"):
    """The frozen text encoder of the students (an `hf-text:` spec of the embedding layer)."""
    from mmcurate.embed import load_encoder

    if not spec.startswith("hf-text:"):
        raise UsageError(f"--text-encoder must be an hf-text: spec, got {spec!r}")
    encoder = load_encoder(spec, device)
    if not encoder.has_text:
        raise UsageError(f"text encoder {spec!r} has no text tower")
    return encoder


def shard_urls(data: str) -> list[str]:
    """Shard URLs of DATA: a directory of .tar files, a glob, a brace pattern or a URL."""
    from mmcurate.data.shards import expand_sources

    if os.path.isdir(data):
        tars = sorted(str(p) for p in Path(data).glob("*.tar"))
        if not tars:
            raise UsageError(f"no .tar shards in directory {data}")
        return tars
    return expand_sources([data])


def _fingerprint(data: str, size: int, text_encoder: str, image_root: str | None) -> tuple:
    """A cache stem name and the list of inputs it was made from."""
    if _is_json(data):
        inputs = [str(Path(data).resolve())]
        name = Path(data).stem
    else:
        inputs = shard_urls(data)
        name = Path(str(data).rstrip("/")).name or "data"
    h = hashlib.sha1(f"{size}|{text_encoder}|{image_root}".encode())
    for item in inputs:
        h.update(item.encode())
        if os.path.exists(item):
            st = os.stat(item)
            h.update(f"{st.st_size}|{st.st_mtime_ns}".encode())
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:40]
    return f"{safe}-{h.hexdigest()[:16]}", inputs


def from_cache(cache_dir: str | os.PathLike, stem: str) -> PairSet:
    """A PairSet from a finished cache stem (images memory-mapped)."""
    done = read_done(cache_dir, stem)
    if done is None:
        raise UsageError(f"no finished data cache {stem!r} in {cache_dir}")
    meta, arrays = read_stem(cache_dir, stem, [TEXT_KEY], ["uid", "caption", "image_index"])
    images = np.load(Path(cache_dir) / f"{stem}.images.npy", mmap_mode="r", allow_pickle=False)
    image_index = meta.column("image_index").to_numpy().astype(np.int64)
    if len(image_index) and image_index.max() >= images.shape[0]:
        raise ShardError(f"{stem}: data cache images and captions disagree; delete {cache_dir}")
    return PairSet(
        images=images,
        image_index=image_index,
        texts=torch.from_numpy(np.array(arrays[TEXT_KEY], dtype=np.float32)),
        captions=meta.column("caption").to_pylist(),
        uids=meta.column("uid").to_pylist(),
        source=str(done.get("source", "")),
        text_encoder=str(done.get("text_encoder", "")),
        skipped=dict(done.get("skipped", {})),
    )


def prepare_pairs(
    data: str,
    *,
    image_size: int,
    text_encoder: str,
    cache_dir: str | os.PathLike,
    image_root: str | None = None,
    device: str = "auto",
) -> str:
    """Decode and encode DATA into the cache unless done already; returns the cache stem."""
    stem, _ = _fingerprint(str(data), image_size, text_encoder, image_root)
    done = read_done(cache_dir, stem)
    if done is not None and (Path(cache_dir) / f"{stem}.images.npy").is_file():
        return stem
    start = time.perf_counter()
    if _is_json(str(data)):
        raw = _read_json(Path(data), image_size, image_root)
    elif str(data).endswith(".json"):
        raise UsageError(f"dataset JSON not found: {data}")
    else:
        raw = _read_shards(shard_urls(str(data)), image_size)
    if not raw.captions:
        raise UsageError(f"no usable image-caption pairs in {data}")
    encoder = load_text_encoder(text_encoder, device)
    texts = encode_captions(encoder, raw.captions).numpy().astype(np.float32)
    if not np.isfinite(texts).all():
        raise MmcurateError(f"text encoder {text_encoder} gave NaN/Inf features for {data}")
    stats = {
        "source": str(data),
        "text_encoder": text_encoder,
        "skipped": dict(raw.skipped),
        "seconds": round(time.perf_counter() - start, 3),
    }
    _write_cache(cache_dir, stem, raw, np.stack(raw.images), texts, stats)
    return stem


def _write_cache(
    cache_dir: str | os.PathLike,
    stem: str,
    raw: _Raw,
    images: np.ndarray,
    texts: np.ndarray,
    stats: dict,
) -> None:
    """Images first, then the store stem (parquet, npz, done marker last), all atomic."""
    import pyarrow as pa

    meta = pa.table(
        {
            "uid": raw.uids,
            "key": raw.keys,
            "caption": raw.captions,
            "url": pa.array(raw.urls, type=pa.string()),
            "shard": raw.shards,
            "image_index": pa.array(raw.image_index, type=pa.int64()),
        }
    )
    save_npy_atomic(Path(cache_dir) / f"{stem}.images.npy", images)
    stats = {
        **stats,
        "image_size": int(images.shape[1]),
        "n_images": int(images.shape[0]),
        "dim": int(texts.shape[1]),
    }
    write_stem(cache_dir, stem, meta, {TEXT_KEY: texts}, stats)


def memory_stem(pairs: PairSet) -> str:
    """A cache stem naming an in-memory PairSet by its content's identity."""
    h = hashlib.sha1(f"{pairs.text_encoder}|{pairs.image_size}|{pairs.n_images}".encode())
    h.update("\n".join(pairs.uids).encode())
    h.update(np.ascontiguousarray(pairs.image_index).tobytes())
    h.update(pairs.texts.numpy().tobytes())
    for start in range(0, pairs.n_images, 4096):
        h.update(np.ascontiguousarray(pairs.images[start : start + 4096]).tobytes())
    return f"memory-{h.hexdigest()[:16]}"


def save_pairs(pairs: PairSet, cache_dir: str | os.PathLike, stem: str = "memory") -> str:
    """Write an in-memory PairSet as a cache stem, so worker processes can memory-map it."""
    raw = _Raw(
        images=[],
        image_index=[int(i) for i in pairs.image_index],
        captions=list(pairs.captions),
        uids=list(pairs.uids),
        keys=[str(i) for i in range(pairs.n_pairs)],
        urls=[None] * pairs.n_pairs,
        shards=[stem] * pairs.n_pairs,
        skipped=Counter(pairs.skipped),
    )
    stats = {"source": pairs.source, "text_encoder": pairs.text_encoder, "skipped": pairs.skipped}
    texts = pairs.texts.numpy().astype(np.float32)
    _write_cache(cache_dir, stem, raw, np.asarray(pairs.images, dtype=np.uint8), texts, stats)
    return stem


def load_pairs(
    data: str,
    *,
    image_size: int,
    text_encoder: str,
    cache_dir: str | os.PathLike,
    image_root: str | None = None,
    device: str = "auto",
) -> PairSet:
    """DATA (Karpathy JSON or shards) as a PairSet, through the cache."""
    stem = prepare_pairs(
        data,
        image_size=image_size,
        text_encoder=text_encoder,
        cache_dir=cache_dir,
        image_root=image_root,
        device=device,
    )
    return from_cache(cache_dir, stem)


def pairs_from_arrays(
    images: np.ndarray,
    captions: Sequence[str],
    text_encoder: str,
    *,
    uids: Sequence[str] | None = None,
    image_index: Sequence[int] | None = None,
    device: str = "cpu",
) -> PairSet:
    """An in-memory PairSet (e.g. the built-in synthetic corpus), texts encoded now."""
    encoder = load_text_encoder(text_encoder, device)
    index = np.arange(len(captions)) if image_index is None else np.asarray(image_index)
    if uids is None:
        uids = [sample_uid("memory", str(i)) for i in range(len(captions))]
    return PairSet(
        images=np.ascontiguousarray(images, dtype=np.uint8),
        image_index=index.astype(np.int64),
        texts=encode_captions(encoder, captions),
        captions=list(captions),
        uids=list(uids),
        source="memory",
        text_encoder=text_encoder,
    )
