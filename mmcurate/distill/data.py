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
import os
import re
import string
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcurate.data.atomic import save_npy_atomic
from mmcurate.data.store import read_done, read_stem, write_stem
from mmcurate.data.uid import sample_uid
from mmcurate.distill.sources import RawPairs, is_json, read_json, read_shards, shard_urls
from mmcurate.embed import DEFAULT_DEVICE
from mmcurate.errors import MmcurateError, ShardError, UsageError
from mmcurate.progress import progress_bar

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


def load_text_encoder(spec: str, device: str = DEFAULT_DEVICE):
    """The frozen text encoder of the students (an `hf-text:` spec of the embedding layer)."""
    from mmcurate.embed import load_encoder

    if not spec.startswith("hf-text:"):
        raise UsageError(f"--text-encoder must be an hf-text: spec, got {spec!r}")
    encoder = load_encoder(spec, device)
    if not encoder.has_text:
        raise UsageError(f"text encoder {spec!r} has no text tower")
    return encoder


def _fingerprint(data: str, size: int, text_encoder: str, image_root: str | None) -> tuple:
    """A cache stem name and the list of inputs it was made from."""
    if is_json(data):
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
    device: str = DEFAULT_DEVICE,
) -> str:
    """Decode and encode DATA into the cache unless done already; returns the cache stem."""
    stem, _ = _fingerprint(str(data), image_size, text_encoder, image_root)
    done = read_done(cache_dir, stem)
    if done is not None and (Path(cache_dir) / f"{stem}.images.npy").is_file():
        return stem
    start = time.perf_counter()
    if is_json(str(data)):
        raw = read_json(Path(data), image_size, image_root)
    elif str(data).endswith(".json"):
        raise UsageError(f"dataset JSON not found: {data}")
    else:
        raw = read_shards(shard_urls(str(data)), image_size)
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
    raw: RawPairs,
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
    raw = RawPairs(
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
