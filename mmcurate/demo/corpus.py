"""Procedural image-text pairs: coloured shapes with compositional captions, written as shards."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmcurate.data.shard_writer import write_shard

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 50, 190),
    "orange": (240, 140, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("gray", "dark", "light")
_BG_LEVEL = {"gray": 128, "dark": 60, "light": 200}


@dataclass(frozen=True)
class Concept:
    """What one procedural image shows."""

    shape: str
    colour: str
    size: str
    position: str
    background: str = "gray"


def random_concept(rng: np.random.Generator, colours: Sequence[str] | None = None) -> Concept:
    """Draw a concept uniformly (optionally from a subset of colours)."""
    colour_pool = list(colours) if colours else list(COLOURS)
    return Concept(
        shape=str(rng.choice(SHAPES)),
        colour=str(rng.choice(colour_pool)),
        size=str(rng.choice(SIZES)),
        position=str(rng.choice(POSITIONS)),
        background=str(rng.choice(BACKGROUNDS)),
    )


def describe(concept: Concept, rng: np.random.Generator) -> str:
    """A caption naming every attribute, in one of a few templates."""
    c = concept
    templates = (
        f"a {c.size} {c.colour} {c.shape} on the {c.position}",
        f"a photo of a {c.size} {c.colour} {c.shape} at the {c.position}",
        f"{c.colour} {c.shape}, {c.size}, {c.position} of a {c.background} background",
        f"there is a {c.size} {c.colour} {c.shape} in the {c.position}",
    )
    return templates[int(rng.integers(len(templates)))]


def _centre(position: str, size: int) -> tuple[float, float]:
    third = size / 3.5
    return {
        "left": (third, size / 2),
        "right": (size - third, size / 2),
        "top": (size / 2, third),
        "bottom": (size / 2, size - third),
        "center": (size / 2, size / 2),
    }[position]


def render(concept: Concept, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Draw the concept with random jitter and pixel noise; returns uint8 (size, size, 3)."""
    level = _BG_LEVEL[concept.background]
    img = Image.new("RGB", (size, size), (level, level, level))
    draw = ImageDraw.Draw(img)
    cx, cy = _centre(concept.position, size)
    cx += rng.uniform(-size / 16, size / 16)
    cy += rng.uniform(-size / 16, size / 16)
    r = size * (0.14 if concept.size == "small" else 0.27) * rng.uniform(0.9, 1.1)
    colour = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLOURS[concept.colour])
    box = (cx - r, cy - r, cx + r, cy + r)
    if concept.shape == "circle":
        draw.ellipse(box, fill=colour)
    elif concept.shape == "ring":
        draw.ellipse(box, outline=colour, width=max(1, int(r / 2.5)))
    elif concept.shape == "square":
        draw.rectangle(box, fill=colour)
    elif concept.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif concept.shape == "cross":
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    else:
        draw.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=colour)
    pixels = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, size=(size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def make_pairs(
    n: int, seed: int = 0, image_size: int = 32, colours: Sequence[str] | None = None
) -> dict:
    """n in-memory pairs: `images` uint8 (n,H,W,3), `captions` list[str], `concepts` list."""
    rng = np.random.default_rng(seed)
    concepts = [random_concept(rng, colours) for _ in range(n)]
    images = (
        np.stack([render(c, rng, image_size) for c in concepts])
        if n
        else np.zeros((0, image_size, image_size, 3), np.uint8)
    )
    captions = [describe(c, rng) for c in concepts]
    return {"images": images, "captions": captions, "concepts": concepts}


def encode_image(pixels: np.ndarray, fmt: str = "jpeg") -> bytes:
    """Encode a uint8 HWC image as JPEG or PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(
        buf, format=fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {})
    )
    return buf.getvalue()


def pair_files(image: np.ndarray, caption: str, meta: dict, fmt: str = "jpg") -> dict[str, bytes]:
    """The webdataset members of one pair: image, caption text and json metadata."""
    return {
        fmt: encode_image(image, "png" if fmt == "png" else "jpeg"),
        "txt": caption.encode(),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


def generate_corpus(
    out_dir: str | os.PathLike,
    n_shards: int = 3,
    per_shard: int = 100,
    seed: int = 0,
    image_size: int = 32,
    colours: Sequence[str] | None = None,
) -> list[Path]:
    """Write `n_shards` webdataset tars of procedural pairs; json carries the concept."""
    pairs = make_pairs(n_shards * per_shard, seed, image_size, colours)
    paths = []
    for s in range(n_shards):
        rows = range(s * per_shard, (s + 1) * per_shard)
        samples = [
            (
                f"{i:09d}",
                pair_files(
                    pairs["images"][i],
                    pairs["captions"][i],
                    {"concept": asdict(pairs["concepts"][i]), "url": f"synthetic://{i}"},
                ),
            )
            for i in rows
        ]
        paths.append(write_shard(Path(out_dir) / f"{s:05d}.tar", samples))
    return paths
