"""The demo corpus: a pool with injected faults whose ground truth is kept, plus clean splits.

Splits (all procedural, from `mmcurate.demo.corpus`):
- `train`: the teacher's training pairs, written nowhere (the teacher trains in memory). About
  15% carry a generic caption, because generic captions only fool CLIPScore when the teacher saw
  them in training; the rare colour appears in a small share of it.
- `pool`: the corpus to curate, as webdataset shards. Each sample's json holds its fault:
  - `clean`: a correct caption of a common-colour concept;
  - `misaligned`: the caption of another, random concept;
  - `generic`: a caption that fits any image ("a picture");
  - `duplicate`: a group of copies of one image and caption, re-posted under other uids and
    URLs (the commonest web duplicate; a re-render of the same concept would be no more alike
    than two clean pairs of that concept, which no embedding could single out). As in the
    dedup literature, a group of N copies holds N - 1 duplicates: one copy is the pair itself;
  - `rare`: a correct, specific caption of the rare colour (good data CLIPScore may under-rate).
- `target`: images of the downstream task (blue objects only), for NormSim.
- `test`: held-out clean pairs for retrieval.

`ground_truth.json` lists every pool sample's uid, fault, duplicate group and target relevance.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mmcurate.data.atomic import write_json_atomic
from mmcurate.data.shard_writer import write_shard
from mmcurate.demo.corpus import (
    COLOURS,
    Concept,
    describe,
    encode_image,
    pair_files,
    random_concept,
    render,
)
from mmcurate.errors import UsageError

FAULTS = ("clean", "misaligned", "generic", "duplicate", "rare")
NOISE_FAULTS = ("misaligned", "generic")
RARE_COLOUR = "orange"
TARGET_COLOURS = ("blue",)
COMMON_COLOURS = tuple(c for c in COLOURS if c != RARE_COLOUR)
GENERIC_CAPTIONS = (
    "a picture",
    "an image",
    "a photo",
    "a photo of an object",
    "a shape on a background",
    "an object in a picture",
    "a simple drawing",
    "something in the image",
)
DUPLICATE_GROUP = 5  # copies of one pair: the pair itself and four duplicates


@dataclass(frozen=True)
class DemoSizes:
    """How many pairs each split holds, and the shares of the pool's faults."""

    train: int = 3000
    pool: int = 2000
    target: int = 200
    test: int = 200
    pool_shards: int = 8
    image_size: int = 32
    generic_train_share: float = 0.15
    rare_train_share: float = 0.02
    shares: dict[str, float] = field(
        default_factory=lambda: {
            "misaligned": 0.12,
            "generic": 0.10,
            "duplicate": 0.08,
            "rare": 0.05,
        }
    )

    def fault_counts(self) -> dict[str, int]:
        """Pool samples per fault; the duplicate share counts each group's copies beyond one,
        so `duplicate` holds whole groups of copies; clean takes the rest."""
        counts = {f: int(round(self.shares.get(f, 0.0) * self.pool)) for f in FAULTS[1:]}
        counts["duplicate"] = counts["duplicate"] // (DUPLICATE_GROUP - 1) * DUPLICATE_GROUP
        counts["clean"] = self.pool - sum(counts.values())
        if counts["clean"] < counts["duplicate"] // DUPLICATE_GROUP:
            raise UsageError(f"demo pool of {self.pool} is too small for its fault shares")
        return counts

    @classmethod
    def scaled(cls, scale: float) -> DemoSizes:
        """Every split scaled by `scale` (for reduced runs), with sane minimums."""
        if not 0 < scale <= 4:
            raise UsageError(f"--size must be in (0, 4], got {scale}")
        base = cls()
        return cls(
            train=max(200, int(base.train * scale)),
            pool=max(200, int(base.pool * scale)),
            target=max(40, int(base.target * scale)),
            test=max(50, int(base.test * scale)),
            pool_shards=max(2, int(round(base.pool_shards * min(scale, 1.0)))),
        )


def specific_caption(concept: Concept) -> str:
    """A caption naming every attribute, the background included."""
    c = concept
    return f"a {c.size} {c.colour} {c.shape} on the {c.position} of a {c.background} background"


def demo_uid(seed: int, split: str, index: int) -> str:
    """A stable 32-hex uid for a demo sample, stored in its json (so ground truth can join)."""
    return hashlib.md5(f"mmcurate-demo/{seed}/{split}/{index}".encode()).hexdigest()


def make_teacher_split(sizes: DemoSizes, seed: int) -> dict:
    """The teacher's training pairs: images uint8 (n,H,W,3), captions (some generic) and the
    concepts drawn (the image tower's pretraining labels)."""
    rng = np.random.default_rng([seed, 1])
    images, captions, concepts = [], [], []
    for _ in range(sizes.train):
        rare = rng.random() < sizes.rare_train_share
        concept = random_concept(rng, (RARE_COLOUR,) if rare else COMMON_COLOURS)
        concepts.append(concept)
        images.append(render(concept, rng, sizes.image_size))
        if rng.random() < sizes.generic_train_share:
            captions.append(str(rng.choice(GENERIC_CAPTIONS)))
        else:
            captions.append(describe(concept, rng))
    return {"images": np.stack(images), "captions": captions, "concepts": concepts}


def _pool_record(fault: str, concept: Concept, caption: str, **extra) -> dict:
    return {"fault": fault, "concept": concept, "caption": caption, **extra}


def make_pool_records(sizes: DemoSizes, seed: int) -> list[dict]:
    """The pool's samples before rendering: fault, drawn concept, caption, duplicate group."""
    rng = np.random.default_rng([seed, 2])
    counts = sizes.fault_counts()
    records: list[dict] = []
    for _ in range(counts["clean"]):
        concept = random_concept(rng, COMMON_COLOURS)
        records.append(_pool_record("clean", concept, describe(concept, rng)))
    for _ in range(counts["misaligned"]):
        concept = random_concept(rng, COMMON_COLOURS)
        other = random_concept(rng, COMMON_COLOURS)
        while (other.shape, other.colour) == (concept.shape, concept.colour):
            other = random_concept(rng, COMMON_COLOURS)
        records.append(
            _pool_record("misaligned", concept, describe(other, rng), caption_concept=other)
        )
    for _ in range(counts["generic"]):
        concept = random_concept(rng, COMMON_COLOURS)
        records.append(_pool_record("generic", concept, str(rng.choice(GENERIC_CAPTIONS))))
    for group in range(counts["duplicate"] // DUPLICATE_GROUP):
        concept = random_concept(rng, COMMON_COLOURS)
        caption = describe(concept, rng)
        for copy in range(DUPLICATE_GROUP):
            records.append(
                _pool_record("duplicate", concept, caption, dup_group=group, dup_copy=copy)
            )
    for _ in range(counts["rare"]):
        concept = random_concept(rng, (RARE_COLOUR,))
        records.append(_pool_record("rare", concept, specific_caption(concept)))
    order = rng.permutation(len(records))
    return [records[i] for i in order]


def _ground_truth_row(uid: str, index: int, record: dict) -> dict:
    concept = record["concept"]
    return {
        "uid": uid,
        "index": index,
        "fault": record["fault"],
        "noise": record["fault"] in NOISE_FAULTS,
        "dup_group": record.get("dup_group", -1),
        "dup_copy": record.get("dup_copy", -1),
        "target_relevant": concept.colour in TARGET_COLOURS,
        "colour": concept.colour,
        "caption": record["caption"],
    }


def _shard_slices(n: int, shards: int) -> list[range]:
    bounds = np.linspace(0, n, shards + 1).round().astype(int)
    return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def write_pool(out_dir: Path, sizes: DemoSizes, seed: int) -> list[dict]:
    """Render and write the pool shards; returns the ground-truth rows."""
    rng = np.random.default_rng([seed, 3])
    records = make_pool_records(sizes, seed)
    truth = []
    group_images: dict[int, np.ndarray] = {}
    for s, rows in enumerate(_shard_slices(len(records), sizes.pool_shards)):
        samples = []
        for i in rows:
            record = records[i]
            uid = demo_uid(seed, "pool", i)
            row = _ground_truth_row(uid, i, record)
            truth.append(row)
            image = render(record["concept"], rng, sizes.image_size)
            if row["dup_group"] >= 0:
                image = group_images.setdefault(row["dup_group"], image)
            meta = {
                "uid": uid,
                "url": f"synthetic://pool/{i}",
                "concept": asdict(record["concept"]),
                "ground_truth": {k: row[k] for k in ("fault", "noise", "dup_group", "dup_copy")},
            }
            samples.append((f"{i:09d}", pair_files(image, record["caption"], meta)))
        write_shard(out_dir / f"{s:05d}.tar", samples)
    return truth


def write_target(out_dir: Path, sizes: DemoSizes, seed: int) -> None:
    """The downstream task's images (target colours only), image-only samples for NormSim."""
    rng = np.random.default_rng([seed, 4])
    samples = []
    for i in range(sizes.target):
        concept = random_concept(rng, TARGET_COLOURS)
        meta = {"uid": demo_uid(seed, "target", i), "concept": asdict(concept)}
        files = {
            "jpg": encode_image(render(concept, rng, sizes.image_size)),
            "json": json.dumps(meta, sort_keys=True).encode(),
        }
        samples.append((f"{i:09d}", files))
    write_shard(out_dir / "00000.tar", samples)


def write_test(out_dir: Path, sizes: DemoSizes, seed: int) -> None:
    """Held-out clean pairs (common colours, like the pool's clean pairs) for retrieval."""
    rng = np.random.default_rng([seed, 5])
    samples = []
    for i in range(sizes.test):
        concept = random_concept(rng, COMMON_COLOURS)
        meta = {"uid": demo_uid(seed, "test", i), "concept": asdict(concept)}
        image = render(concept, rng, sizes.image_size)
        samples.append((f"{i:09d}", pair_files(image, describe(concept, rng), meta)))
    write_shard(out_dir / "00000.tar", samples)


def write_demo_corpus(out_dir: str | os.PathLike, sizes: DemoSizes, seed: int) -> dict:
    """Write pool, target and test shards plus `ground_truth.json`; returns their paths."""
    root = Path(out_dir)
    truth = write_pool(root / "pool", sizes, seed)
    write_target(root / "target", sizes, seed)
    write_test(root / "test", sizes, seed)
    write_json_atomic(
        root / "ground_truth.json",
        {"seed": seed, "sizes": asdict(sizes), "samples": truth},
    )
    return corpus_paths(root, sizes)


def corpus_paths(root: str | os.PathLike, sizes: DemoSizes) -> dict:
    """Where `write_demo_corpus` puts each split (brace patterns for the shard sets)."""
    root = Path(root)
    last = len(_shard_slices(sizes.pool, sizes.pool_shards)) - 1
    return {
        "pool": str(root / "pool" / f"{{00000..{last:05d}}}.tar"),
        "target": str(root / "target" / "00000.tar"),
        "test": str(root / "test" / "00000.tar"),
        "ground_truth": str(root / "ground_truth.json"),
    }
