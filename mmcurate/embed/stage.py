"""The `embed` stage: shards -> store stems, one work item per shard.

Each shard is read once, by the task's own process; its batches go to DataLoader workers that
decode the images (or, with `--decode gpu`, are decoded on the encoder's device), in order, so
the output is byte-identical for any number of decode workers."""

from __future__ import annotations

import functools
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmcurate.data.shards import ShardItem, iter_samples, shard_items
from mmcurate.data.skips import (
    DUPLICATE_UID,
    MISSING_CAPTION,
    MISSING_IMAGE,
    NONFINITE_EMBEDDING,
    UNDECODABLE_IMAGE,
)
from mmcurate.data.store import IMG_KEY, TXT_KEY, is_done, write_stem
from mmcurate.embed.decode import DECODERS, decode_image, decode_on_device
from mmcurate.embed.encoders import DEFAULT_DEVICE, check_device_name, load_encoder
from mmcurate.engine import Executor, run_stage, summarise
from mmcurate.errors import UsageError

MODALITIES = ("both", "image", "text")


@dataclass(frozen=True)
class EmbedConfig:
    """Settings of `mmcurate embed`: which encoders, which modalities, how to batch and decode."""

    model: str
    text_model: str | None = None
    modality: str = "both"
    batch_size: int = 256
    device: str = DEFAULT_DEVICE
    decode_workers: int = 2
    decode: str = "cpu"

    @property
    def image_spec(self) -> str | None:
        """The encoder of the images, when images are embedded."""
        return self.model if self.modality != "text" else None

    @property
    def text_spec(self) -> str | None:
        """The encoder of the captions, when captions are embedded."""
        return (self.text_model or self.model) if self.modality != "image" else None


def _sample_problem(sample: dict, needs_image: bool, needs_text: bool) -> str | None:
    if sample["problem"]:
        return sample["problem"]
    if needs_image and not sample["image"]:
        return MISSING_IMAGE
    if needs_text and not (sample["caption"] or "").strip():
        return MISSING_CAPTION
    return None


ROW_FIELDS = ("uid", "key", "caption", "url")
READER_FIELDS = ("image", "problem", "uid_source")


class ShardReader:
    """The batches of one shard, read once, in this process: (index, samples) of consecutive
    samples, each holding only what embedding needs. Given to the DataLoader as its sampler, so
    decode workers get batches from this single reader instead of each reading the tar."""

    def __init__(self, url: str, batch_size: int) -> None:
        self.url = url
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[tuple[int, list[dict]]]:
        batch: list[dict] = []
        index = 0
        for sample in iter_samples(self.url):
            batch.append({k: sample[k] for k in (*ROW_FIELDS, *READER_FIELDS)})
            if len(batch) == self.batch_size:
                yield index, batch
                batch, index = [], index + 1
        if batch:
            yield index, batch


class BatchDecoder(Dataset):
    """Turns one batch of raw samples into rows, pixels (or raw JPEG bytes for device
    decoding) and the problems of the samples it skips; runs in the DataLoader's workers."""

    def __init__(self, preprocess: Callable | None, modality: str, on_device: bool) -> None:
        self.preprocess = preprocess
        self.needs_image = modality in ("both", "image")
        self.needs_text = modality in ("both", "text")
        self.on_device = on_device

    def __getitem__(self, key: tuple[int, list[dict]]) -> dict:
        index, samples = key
        rows, pixels, raw, problems = [], [], [], []
        for s in samples:
            problem = _sample_problem(s, self.needs_image, self.needs_text)
            tensor = None
            if problem is None and self.needs_image and not self.on_device:
                try:
                    tensor = decode_image(s["image"], self.preprocess)
                except Exception:
                    problem = UNDECODABLE_IMAGE
            if problem is not None:
                problems.append((s["uid"], problem))
                continue
            rows.append({k: s[k] for k in ROW_FIELDS})
            if tensor is not None:
                pixels.append(tensor)
            elif self.needs_image:
                raw.append(s["image"])
        return {
            "index": index,
            "rows": rows,
            "pixels": torch.stack(pixels) if pixels else None,
            "raw": raw,
            "problems": problems,
            "uid_sources": [s["uid_source"] for s in samples],
        }


def _as_is(batch: dict) -> dict:
    return batch


# Decode workers fork on Linux, as the DataLoader's default there, also inside a pool worker,
# whose default start method is its own pool's (a spawned decode worker imports torch anew for
# every shard).
DECODE_START = "fork" if sys.platform.startswith("linux") else None


def _loader(reader: ShardReader, decoder: BatchDecoder, decode_workers: int) -> DataLoader:
    return DataLoader(
        decoder,
        batch_size=None,
        sampler=reader,
        collate_fn=_as_is,
        num_workers=decode_workers,
        prefetch_factor=4 if decode_workers else None,
        persistent_workers=False,
        multiprocessing_context=DECODE_START if decode_workers else None,
    )


def _device_pixels(batch: dict, preprocess: Callable, device: torch.device) -> int:
    """Decode a batch's raw images on the device (`--decode gpu`); rows whose image does not
    decode anywhere move to the batch's problems. Returns how many fell back to PIL."""
    decoded, fallbacks = decode_on_device(batch["raw"], preprocess, device)
    good = [i for i, t in enumerate(decoded) if t is not None]
    for i in (i for i, t in enumerate(decoded) if t is None):
        batch["problems"].append((batch["rows"][i]["uid"], UNDECODABLE_IMAGE))
    batch["rows"] = [batch["rows"][i] for i in good]
    batch["pixels"] = torch.stack([decoded[i] for i in good]) if good else None
    return fallbacks


def embed_shard(config: EmbedConfig, out: str, item: ShardItem) -> dict:
    """Embed one shard into `<out>/<stem>.parquet|.npz|.done.json`; returns its stats."""
    import pyarrow as pa

    start = time.perf_counter()
    stem, modality = item.name, config.modality
    image_enc = load_encoder(config.image_spec, config.device) if config.image_spec else None
    text_enc = load_encoder(config.text_spec, config.device) if config.text_spec else None
    preprocess = image_enc.preprocess if image_enc else None
    on_device = config.decode == "gpu" and image_enc is not None
    reader = ShardReader(item.url, config.batch_size)
    decoder = BatchDecoder(preprocess, modality, on_device)
    fallbacks = 0
    seen: set[str] = set()
    skipped: Counter[str] = Counter()
    rows: list[dict] = []
    img_parts: list[np.ndarray] = []
    txt_parts: list[np.ndarray] = []
    read = 0
    sources: Counter[str] = Counter()
    for batch in _loader(reader, decoder, config.decode_workers):
        sources.update(batch["uid_sources"])
        if on_device:
            fallbacks += _device_pixels(batch, preprocess, image_enc.device)
        read += len(batch["rows"]) + len(batch["problems"])
        skipped.update(reason for _, reason in batch["problems"])
        keep = []
        for i, row in enumerate(batch["rows"]):
            if row["uid"] in seen:
                skipped[DUPLICATE_UID] += 1
                continue
            seen.add(row["uid"])
            keep.append(i)
        if not keep:
            continue
        parts = []
        if image_enc:
            parts.append(image_enc.encode_images(batch["pixels"][keep]).numpy())
        if text_enc:
            parts.append(text_enc.encode_texts([batch["rows"][i]["caption"] for i in keep]).numpy())
        finite = np.all([np.isfinite(p).all(axis=1) for p in parts], axis=0)
        skipped[NONFINITE_EMBEDDING] += int((~finite).sum())
        for j, i in enumerate(keep):
            if finite[j]:
                rows.append(batch["rows"][i])
        idx = np.flatnonzero(finite)
        if image_enc:
            img_parts.append(parts[0][idx].astype(np.float16))
        if text_enc:
            txt_parts.append(parts[-1][idx].astype(np.float16))
    skipped = Counter({k: v for k, v in skipped.items() if v})
    meta = pa.table(
        {
            "uid": pa.array([r["uid"] for r in rows], pa.string()),
            "key": pa.array([r["key"] for r in rows], pa.string()),
            "caption": pa.array([r["caption"] for r in rows], pa.string()),
            "url": pa.array([r["url"] for r in rows], pa.string()),
            "shard": pa.array([stem] * len(rows), pa.string()),
        }
    )
    arrays = {}
    if image_enc:
        arrays[IMG_KEY] = _stack(img_parts, image_enc.dim)
    if text_enc:
        arrays[TXT_KEY] = _stack(txt_parts, text_enc.dim)
    clip = image_enc if image_enc and image_enc.has_text else text_enc
    stats = {
        "read": read,
        "skipped": dict(sorted(skipped.items())),
        "uid_sources": dict(sorted(sources.items())),
        "model": config.model,
        "text_model": config.text_model,
        "modality": modality,
        "logit_scale": clip.logit_scale if clip and not config.text_model else None,
        "dims": {k: int(v.shape[1]) for k, v in arrays.items()},
        "decode": config.decode,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if on_device:
        stats["decode_fallbacks"] = fallbacks
    write_stem(out, stem, meta, arrays, stats)
    return {**stats, "rows": meta.num_rows}


def _stack(parts: list[np.ndarray], dim: int) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float16)


def run_embed(
    sources: Sequence[str], out: str | os.PathLike, config: EmbedConfig, executor: Executor
) -> dict:
    """Embed every unfinished shard of the sources into the store `out`; the end summary."""
    out = os.path.abspath(out)
    items = shard_items(sources)
    check_device_name(config.device)
    if config.decode not in DECODERS:
        raise UsageError(f"--decode must be cpu or gpu, got {config.decode!r}")
    executor.check_device(config.device)
    for spec in filter(None, (config.image_spec, config.text_spec)):
        load_encoder(spec, "cpu")
    outcomes, skipped = run_stage(
        executor,
        functools.partial(embed_shard, config, out),
        items,
        is_done=lambda it: is_done(out, it.name),
        desc="embed",
    )
    summary = summarise(outcomes, skipped)
    sources: Counter[str] = Counter()
    for outcome in outcomes:
        sources.update(outcome.stats.get("uid_sources") or {})
    summary["uid_sources"] = dict(sorted(sources.items()))
    return summary
