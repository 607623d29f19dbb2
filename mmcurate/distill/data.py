"""Real pairs for distillation: Karpathy-split JSON or webdataset shards, cached once.

A `PairSet` holds the decoded images (uint8, one row per image), one row per caption with the
frozen text encoder's CLS features (`normalize=False`), and which image each caption belongs
to (Flickr30k/COCO have 5 captions per image). Loading writes a cache directory in the
embedding-store layout (`<stem>.parquet`, `<stem>.npz` with `txt_cls`, `<stem>.done.json`)
plus `<stem>.images.npy`, so captions are encoded and images decoded only once; expert
workers then memory-map the cache. Images are streamed into the .npy as they are decoded (never
held in memory as a whole), at the resize mode the cache stem names (squash or crop).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcurate.data.atomic import atomic_path
from mmcurate.data.store import read_done, read_stem, write_stem
from mmcurate.data.uid import sample_uid
from mmcurate.distill.augment import check_resize
from mmcurate.distill.npy_rows import NpyRows
from mmcurate.distill.sources import (
    RawPairs,
    is_json,
    json_image_names,
    read_json,
    read_shards,
    shard_urls,
)
from mmcurate.distill.towers import load_text_encoder
from mmcurate.embed import DEFAULT_DEVICE
from mmcurate.errors import MmcurateError, ShardError, UsageError
from mmcurate.progress import progress_bar

MAX_CAPTION_WORDS = 30
TEXT_KEY = "txt_cls"
CACHE_VERSION = 2  # 2: captions cleaned as the reference does, resize mode in the stem
SHARD_CAPACITY = 1024
_STRIPPED = re.compile(r'[.!"()*#:;~]')
_SPACES = re.compile(r"\s{2,}")


def clean_caption(text: str, max_words: int = MAX_CAPTION_WORDS) -> str:
    """The reference's caption cleaning: lower-case, each of .!"()*#:;~ becomes a space, runs
    of whitespace become one space, then cut to `max_words` space-separated words."""
    text = _SPACES.sub(" ", _STRIPPED.sub(" ", text.lower())).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


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
    resize: str = "squash"

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


def encode_captions(encoder, captions: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Cleaned captions -> float32 (n, d) CLS features of the frozen text encoder."""
    cleaned = [clean_caption(c) for c in captions]
    chunks = []
    for start in progress_bar(
        range(0, len(cleaned), batch_size), desc="encode captions", unit="batch", leave=False
    ):
        chunks.append(encoder.encode_texts(cleaned[start : start + batch_size], normalize=False))
    if not chunks:
        return torch.zeros(0, int(encoder.dim))
    return torch.cat(chunks).float()


def _fingerprint(
    data: str, size: int, text_encoder: str, image_root: str | None, resize: str
) -> tuple:
    """A cache stem name and the list of inputs it was made from."""
    if is_json(data):
        inputs = [str(Path(data).resolve())]
        name = Path(data).stem
    else:
        inputs = shard_urls(data)
        name = Path(str(data).rstrip("/")).name or "data"
    key = f"v{CACHE_VERSION}|{size}|{resize}|{text_encoder}|{image_root}"
    h = hashlib.sha1(key.encode())
    checkpoint = text_encoder.partition("@")[2]
    for item in [*inputs, checkpoint] if os.path.isfile(checkpoint) else inputs:
        h.update(item.encode())
        if os.path.exists(item):
            st = os.stat(item)
            h.update(f"{st.st_size}|{st.st_mtime_ns}".encode())
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:40]
    return f"{safe}-{h.hexdigest()[:16]}", inputs


def images_path(cache_dir: str | os.PathLike, stem: str) -> Path:
    """The cache's memory-mapped images of a stem."""
    return Path(cache_dir) / f"{stem}.images.npy"


def from_cache(cache_dir: str | os.PathLike, stem: str) -> PairSet:
    """A PairSet from a finished cache stem (images memory-mapped)."""
    done = read_done(cache_dir, stem)
    if done is None:
        raise UsageError(f"no finished data cache {stem!r} in {cache_dir}")
    meta, arrays = read_stem(cache_dir, stem, [TEXT_KEY], ["uid", "caption", "image_index"])
    images = np.load(images_path(cache_dir, stem), mmap_mode="r", allow_pickle=False)
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
        resize=str(done.get("resize", "crop")),
    )


def prepare_pairs(
    data: str,
    *,
    image_size: int,
    text_encoder: str,
    cache_dir: str | os.PathLike,
    image_root: str | None = None,
    device: str = DEFAULT_DEVICE,
    resize: str = "squash",
) -> str:
    """Decode and encode DATA into the cache unless done already; returns the cache stem.

    Images stream into a preallocated memory-mapped .npy under a temporary name in the cache
    directory, renamed once the captions are encoded too.
    """
    check_resize(resize)
    stem, _ = _fingerprint(str(data), image_size, text_encoder, image_root, resize)
    done = read_done(cache_dir, stem)
    if done is not None and images_path(cache_dir, stem).is_file():
        return stem
    start = time.perf_counter()
    if not is_json(str(data)) and str(data).endswith(".json"):
        raise UsageError(f"dataset JSON not found: {data}")
    row = (image_size, image_size, 3)
    with atomic_path(images_path(cache_dir, stem)) as tmp:
        if is_json(str(data)):
            sink = NpyRows(tmp, row, len(json_image_names(Path(data))))
            raw = read_json(Path(data), image_size, image_root, resize, sink)
        else:
            sink = NpyRows(tmp, row, SHARD_CAPACITY)
            raw = read_shards(shard_urls(str(data)), image_size, resize, sink)
        n_images = sink.close()
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
        "resize": resize,
        "n_images": n_images,
        "image_size": image_size,
    }
    _write_stem(cache_dir, stem, raw, texts, stats)
    return stem


def _write_stem(
    cache_dir: str | os.PathLike, stem: str, raw: RawPairs, texts: np.ndarray, stats: dict
) -> None:
    """The store stem beside the images (parquet, npz, done marker last), all atomic."""
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
    write_stem(cache_dir, stem, meta, {TEXT_KEY: texts}, {**stats, "dim": int(texts.shape[1])})


def memory_stem(pairs: PairSet) -> str:
    """A cache stem naming an in-memory PairSet by its content's identity."""
    head = f"{pairs.text_encoder}|{pairs.image_size}|{pairs.n_images}|{pairs.resize}"
    h = hashlib.sha1(head.encode())
    h.update("\n".join(pairs.uids).encode())
    h.update(np.ascontiguousarray(pairs.image_index).tobytes())
    h.update(pairs.texts.numpy().tobytes())
    for start in range(0, pairs.n_images, 4096):
        h.update(np.ascontiguousarray(pairs.images[start : start + 4096]).tobytes())
    return f"memory-{h.hexdigest()[:16]}"


def save_pairs(pairs: PairSet, cache_dir: str | os.PathLike, stem: str = "memory") -> str:
    """Write an in-memory PairSet as a cache stem, so worker processes can memory-map it."""
    raw = RawPairs(
        image_index=[int(i) for i in pairs.image_index],
        captions=list(pairs.captions),
        uids=list(pairs.uids),
        keys=[str(i) for i in range(pairs.n_pairs)],
        urls=[None] * pairs.n_pairs,
        shards=[stem] * pairs.n_pairs,
        skipped=Counter(pairs.skipped),
    )
    with atomic_path(images_path(cache_dir, stem)) as tmp:
        sink = NpyRows(tmp, (pairs.image_size, pairs.image_size, 3), pairs.n_images)
        for start in range(0, pairs.n_images, 4096):
            for image in np.asarray(pairs.images[start : start + 4096], dtype=np.uint8):
                sink.append(image)
        sink.close()
    stats = {
        "source": pairs.source,
        "text_encoder": pairs.text_encoder,
        "skipped": pairs.skipped,
        "resize": pairs.resize,
        "n_images": pairs.n_images,
        "image_size": pairs.image_size,
    }
    _write_stem(cache_dir, stem, raw, pairs.texts.numpy().astype(np.float32), stats)
    return stem


def load_pairs(data: str, **options: Any) -> PairSet:
    """DATA (Karpathy JSON or shards) as a PairSet, through the cache (`prepare_pairs` options)."""
    return from_cache(options["cache_dir"], prepare_pairs(data, **options))


def pairs_from_arrays(
    images: np.ndarray,
    captions: Sequence[str],
    text_encoder: str,
    *,
    uids: Sequence[str] | None = None,
    image_index: Sequence[int] | None = None,
    device: str = "cpu",
    resize: str = "squash",
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
        resize=check_resize(resize),
    )
