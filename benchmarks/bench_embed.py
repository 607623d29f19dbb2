"""`mmcurate embed` throughput on JPEG shards vs a plain loop over pre-decoded tensors.

Run: .venv/bin/python benchmarks/bench_embed.py [--model open_clip:ViT-B-32] [--samples 512]
Both sides use the same encoder, batch size and compute threads; the embed side reads the shard
once and decodes JPEGs in DataLoader workers while the model runs, so a ratio near 1 means
decoding is hidden. Each figure is the best of >= 3 runs after a warm-up; the 1-minute load
average at the start is printed first.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import REPEATS, best_of, header
from PIL import Image

from mmcurate.data.shard_writer import write_shard
from mmcurate.data.shards import ShardItem
from mmcurate.demo.corpus import make_pairs, pair_files
from mmcurate.embed import load_encoder
from mmcurate.embed.stage import EmbedConfig, embed_shard
from mmcurate.engine.base import pin_threads


def make_shard(root: Path, samples: int, size: int) -> Path:
    """One webdataset shard of `samples` JPEG pairs at `size` px."""
    pairs = make_pairs(samples, seed=0, image_size=size)
    items = [
        (f"{i:06d}", pair_files(pairs["images"][i], pairs["captions"][i], {}))
        for i in range(samples)
    ]
    return write_shard(root / "bench.tar", items)


def plain_loop(model: str, shard: Path, batch_size: int, repeats: int) -> float:
    """Samples/s of the model alone on tensors decoded beforehand (best of `repeats`)."""
    import webdataset as wds

    enc = load_encoder(model, "cpu")
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    pixels = torch.stack(
        [enc.preprocess(Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for s in samples]
    )
    captions = [s["txt"].decode() for s in samples]

    def once() -> float:
        start = time.perf_counter()
        for i in range(0, len(samples), batch_size):
            enc.encode_images(pixels[i : i + batch_size]).numpy().astype(np.float16)
            enc.encode_texts(captions[i : i + batch_size]).numpy().astype(np.float16)
        return len(samples) / (time.perf_counter() - start)

    return best_of(once, key=lambda rate: -rate, repeats=repeats)


def embed_stage(model: str, shard: Path, batch_size: int, out: Path, workers: int) -> float:
    """Samples/s of the embed stage (reading, decoding, inference, writing) on the shard."""
    config = EmbedConfig(model, batch_size=batch_size, device="cpu", decode_workers=workers)
    start = time.perf_counter()
    stats = embed_shard(config, str(out), ShardItem("bench", str(shard)))
    return stats["rows"] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="open_clip:ViT-B-32")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--decode-workers", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=REPEATS)
    args = parser.parse_args()
    print(header("embed stage vs model-only loop", args.repeat))
    pin_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shard = make_shard(root, args.samples, args.image_size)
        load_encoder(args.model, "cpu")
        embed_stage(args.model, shard, args.batch_size, root / "warm", args.decode_workers)
        plain = plain_loop(args.model, shard, args.batch_size, args.repeat)
        outs = (root / f"out{i}" for i in range(args.repeat))
        staged = best_of(
            lambda: embed_stage(
                args.model, shard, args.batch_size, next(outs), args.decode_workers
            ),
            key=lambda rate: -rate,
            repeats=args.repeat,
        )
    print(
        f"model {args.model}, {args.samples} JPEGs at {args.image_size}px, batch {args.batch_size},"
    )
    print(f"{args.threads} compute thread(s), {args.decode_workers} decode worker(s)\n")
    print("| variant | samples/s | ratio |")
    print("|---|---:|---:|")
    print(f"| plain loop on pre-decoded tensors | {plain:,.1f} | 1.00 |")
    print(f"| mmcurate embed stage on JPEG shard | {staged:,.1f} | {staged / plain:.2f} |")


if __name__ == "__main__":
    main()
