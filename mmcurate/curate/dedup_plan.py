"""Settings of the SemDeDup stage: the user's `DedupConfig` (every default, once), the
`DedupJob` it resolves to after a scan of the store that writes nothing, and the JSON markers
that tell each phase what is already done."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmcurate.curate.semdedup import KEEP_ORDERS
from mmcurate.curate.validity import valid_rows
from mmcurate.data.atomic import read_json_dict
from mmcurate.data.store import finished_stems, read_stem
from mmcurate.errors import ShardError, UsageError


def sha256_hex(data: bytes) -> str:
    """The sha256 of some bytes, as hex: what markers use to name their inputs."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class DedupConfig:
    """Options of SemDeDup. `clusters` None means round(√N) (at least 1) for N scored rows;
    `keep` orders each cluster (hard|easy|random); `train` caps the k-means sample. `block` and
    `task_rows` only set memory and task size: the values do not depend on them."""

    clusters: int | None = None
    keep: str = "hard"
    train: int = 1_000_000
    seed: int = 0
    iterations: int = 20
    block: int = 1024
    task_rows: int = 50_000


@dataclass(frozen=True)
class DedupJob:
    """The resolved run: the stems taking part with their scored-row counts, and the settings."""

    store: str
    work: str
    keys: tuple[str, ...]
    stems: tuple[str, ...]
    counts: tuple[int, ...]
    dim: int
    clusters: int
    keep: str
    train: int
    seed: int
    iterations: int
    block: int
    task_rows: int
    device: str | None
    signature: str  # sha256 of everything the clustering depends on

    @property
    def offsets(self) -> np.ndarray:
        """Global id of each stem's first scored row (and the total at the end)."""
        return np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)]).astype(np.int64)

    def path(self, *parts: str) -> Path:
        """A file in the work dir."""
        return Path(self.work, *parts)


# --------------------------------------------------------------------------- scan


def open_stem(store: str, stem: str, keys: Sequence[str]) -> tuple[Any, dict, np.ndarray, dict]:
    """A stem's uid column, memory-mapped arrays, scored rows and skip counts (or ShardError)."""
    import pyarrow as pa

    meta, arrays = read_stem(store, stem, keys, columns=("uid",))
    uid_type = meta.schema.field("uid").type
    if not (pa.types.is_string(uid_type) or pa.types.is_large_string(uid_type)):
        raise ShardError(f"{stem}: uid column has type {uid_type}, expected strings")
    dims = {k: arrays[k].shape[1] for k in keys}
    if len(set(dims.values())) > 1:
        raise ShardError(f"{stem}: embedding dims differ between arrays {dims}")
    uids = meta.column("uid").to_pylist()
    valid, skipped = valid_rows(uids, [arrays[k] for k in keys])
    return uids, arrays, valid, skipped


def stem_rows(job: DedupJob, index: int) -> tuple[list, np.ndarray, np.ndarray]:
    """uids, image rows (memmap) and scored rows of a stem, checked against the scan."""
    stem = job.stems[index]
    uids, arrays, valid, _ = open_stem(job.store, stem, job.keys)
    img = arrays[job.keys[0]]
    if len(valid) != job.counts[index] or img.shape[1] != job.dim:
        raise ShardError(f"{stem}: changed since the scan ({len(valid)} rows, dim {img.shape[1]})")
    return uids, img, valid


def _scan(store: str, keys: Sequence[str]) -> tuple[list[dict], dict[str, str]]:
    """Per stem: read, scored and skipped rows and dim; stems that cannot take part, with why."""
    scanned, failed = [], {}
    for stem in finished_stems(store):
        try:
            _, arrays, valid, skipped = open_stem(store, stem, keys)
        except ShardError as exc:
            failed[stem] = str(exc)
            continue
        img = arrays[keys[0]]
        scanned.append(
            {
                "stem": stem,
                "read": len(img),
                "rows": len(valid),
                "skipped": skipped,
                "dim": img.shape[1],
            }
        )
    dims = [s["dim"] for s in scanned if s["rows"]]
    dim = max(dict.fromkeys(dims), key=lambda d: (dims.count(d), -dims.index(d)), default=0)
    for s in [s for s in scanned if s["rows"] and s["dim"] != dim]:
        failed[s["stem"]] = f"{s['stem']}: embedding dim {s['dim']} differs from the store's {dim}"
        scanned.remove(s)
    return scanned, failed


def check_config(config: DedupConfig) -> None:
    """Refuse bad options (one line each) before anything is read."""
    if config.clusters is not None and config.clusters < 1:
        raise UsageError(f"--clusters must be >= 1, got {config.clusters}")
    if config.keep not in KEEP_ORDERS:
        raise UsageError(
            f"--dedup-keep must be one of {', '.join(KEEP_ORDERS)}, got {config.keep!r}"
        )
    for flag, value in (("--dedup-train", config.train), ("iterations", config.iterations)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    for name in ("block", "task_rows"):
        if getattr(config, name) < 1:
            raise UsageError(f"{name} must be >= 1, got {getattr(config, name)}")


def plan_semdedup(
    store: str,
    work_dir: str,
    keys: Sequence[str],
    config: DedupConfig,
    device: str | None = None,
) -> tuple[DedupJob, list[dict], dict[str, str]]:
    """Check options, scan the store (writing nothing) and resolve K; UsageError on bad input."""
    check_config(config)
    if not keys:
        raise ValueError("keys must name the image array first")
    scanned, failed = _scan(store, keys)
    n = sum(s["rows"] for s in scanned)
    k = config.clusters if config.clusters is not None else min(n, max(1, round(math.sqrt(n))))
    if k > n:
        raise UsageError(f"--clusters {k} is more than the {n} rows to deduplicate")
    if n and config.train < k:
        raise UsageError(f"--dedup-train {config.train} must be at least --clusters {k}")
    dim = max((s["dim"] for s in scanned if s["rows"]), default=0)
    settings = {
        "store": str(Path(store).resolve()),
        "keys": list(keys),
        "stems": [[s["stem"], s["rows"]] for s in scanned],
        "dim": dim,
        "clusters": k,
        "train": config.train,
        "seed": config.seed,
        "iterations": config.iterations,
    }
    job = DedupJob(
        store=str(store),
        work=str(work_dir),
        keys=tuple(keys),
        stems=tuple(s["stem"] for s in scanned),
        counts=tuple(s["rows"] for s in scanned),
        dim=dim,
        clusters=k,
        keep=config.keep,
        train=config.train,
        seed=config.seed,
        iterations=config.iterations,
        block=config.block,
        task_rows=config.task_rows,
        device=device,
        signature=sha256_hex(json.dumps(settings, sort_keys=True).encode()),
    )
    return job, scanned, failed


def current_marker(data: Path, marker: Path, **expect: Any) -> dict | None:
    """The marker when its data file exists and it records every expected value; else None."""
    found = read_json_dict(marker)
    if found is None or not data.exists():
        return None
    return found if all(found.get(k) == v for k, v in expect.items()) else None
