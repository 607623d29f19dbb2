"""`--keep datacomp:image_based`: DataComp's image-based baseline over the rows still alive.

1. Caption filter (fastText en, > 1 fastText token, > 5 characters) on the alive rows.
2. Each target row (ImageNet-1k `l14_img`, e.g. DataComp's `in1k_clip_vit_l14_{0..4}.pt`) and
   each candidate's `l14_img` gets the centroid of largest inner product.
3. A candidate is kept when its centroid is one that some target picked.

The centroids are DataComp's `{scale}_centroids_l14.pt` or a `.npy` (`--centroids`); without
them they are made here by the FAISS k-means SemDeDup uses (`semdedup.train_centroids`) on a
seeded sample of the pool's caption-filtered rows, `--image-clusters` of them (at most rows/39).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmcurate.curate.centroids import CENTROID, load_centroids, nearest_by_inner_product
from mmcurate.curate.datacomp_rules import Columns, caption_filter_mask
from mmcurate.curate.lang import file_sha256
from mmcurate.curate.pool import Pool
from mmcurate.curate.semdedup import train_centroids, unit_rows
from mmcurate.data.atomic import save_npy_atomic
from mmcurate.errors import UsageError

POINTS_PER_CLUSTER = 39  # FAISS's minimum without a warning
SAMPLE_PER_CLUSTER = 256  # FAISS's default max_points_per_centroid
KMEANS_ITERATIONS = 20  # DataComp's image_based_clustering.py


@dataclass(frozen=True)
class ImageBasedConfig:
    """Inputs of the image-based rule: centroid file (None: k-means here), target paths, the
    k-means cluster count and seed, the npz key (None: l14_img, else detected), device, and
    where to save centroids made here (None: not saved)."""

    centroids: str | None
    target: tuple[str, ...]
    clusters: int
    seed: int
    img_key: str | None
    device: str
    save_centroids: str | None = None


class ImageBased:
    """The image-based rule, checked before any work: targets, centroids and their widths."""

    def __init__(self, config: ImageBasedConfig, store: Path | None, stems: list[str]) -> None:
        from mmcurate.curate.targets import load_target
        from mmcurate.data.store import detect_keys, npz_keys, read_arrays
        from mmcurate.embed import check_device_name

        check_device_name(config.device)
        if not config.target:
            raise UsageError("datacomp:image_based needs --target (e.g. in1k_clip_vit_l14_0.pt)")
        if store is None:
            raise UsageError("datacomp:image_based needs --store (the l14_img embeddings)")
        if config.clusters < 1:
            raise UsageError(f"--image-clusters must be >= 1, got {config.clusters}")
        self.config, self.store = config, store
        keys = npz_keys(store, stems[0])
        self.key = config.img_key or ("l14_img" if "l14_img" in keys else None)
        self.key = self.key or detect_keys(store, need_txt=False)[0]
        dim = read_arrays(store, stems[0], [self.key])[self.key].shape[1]
        self.targets = load_target(config.target, self.key)
        if self.targets.shape[1] != dim:
            raise UsageError(
                f"target has width {self.targets.shape[1]}, but {self.key} has width {dim}"
            )
        self.centroids = None
        if config.centroids is not None:
            self.centroids = load_centroids(config.centroids)
            if self.centroids.shape[1] != dim:
                raise UsageError(
                    f"centroids {config.centroids} have width {self.centroids.shape[1]}, "
                    f"but {self.key} has width {dim}"
                )
        self.dim = dim

    def _embeddings(self, pool: Pool, i: int, rows: np.ndarray) -> np.ndarray:
        """The `key` rows of pool file i's positions `rows` (ascending), as float32."""
        from mmcurate.data.store import read_arrays

        stem = pool.stems[i]
        arr = read_arrays(self.store, stem, [self.key])[self.key]
        mapped = pool.store_rows(i)
        return np.asarray(arr[rows if mapped is None else mapped[rows]], dtype=np.float32)

    def _train(self, pool: Pool, caption: np.ndarray) -> tuple[np.ndarray, dict]:
        """k-means centroids on a seeded sample of the caption-filtered rows."""
        rows = np.flatnonzero(caption)
        if len(rows) == 0:
            raise UsageError("datacomp:image_based: no row passes the caption filter to cluster")
        k = max(1, min(self.config.clusters, len(rows) // POINTS_PER_CLUSTER))
        m = min(len(rows), k * SAMPLE_PER_CLUSTER)
        rng = np.random.default_rng(self.config.seed)
        sample = np.sort(rng.choice(rows, m, replace=False))
        x = np.empty((m, self.dim), dtype=np.float32)
        bounds = np.searchsorted(sample, pool.offsets)
        for i in range(len(pool.paths)):
            lo, hi = bounds[i], bounds[i + 1]
            if lo < hi:
                x[lo:hi] = self._embeddings(pool, i, sample[lo:hi] - pool.offsets[i])
        centroids = train_centroids(
            unit_rows(x), k, iterations=KMEANS_ITERATIONS, seed=self.config.seed
        )
        made = {"source": "k-means", "clusters": k, "train_rows": m}
        if self.config.save_centroids:
            save_npy_atomic(self.config.save_centroids, centroids)
            made["saved"] = str(self.config.save_centroids)
        return centroids, made

    def run(self, pool: Pool, alive: np.ndarray, cols: Columns) -> tuple[np.ndarray, dict]:
        """The alive rows the rule keeps, and its record."""
        caption = pool.per_file(
            [cols["lang"], cols["text"]],
            lambda table, _: caption_filter_mask(table, cols),
            bool,
            "select: image_based caption filter",
        )
        if self.centroids is None:
            centroids, made = self._train(pool, caption)
        else:
            centroids = self.centroids
            sha = file_sha256(self.config.centroids)
            made = {"source": str(self.config.centroids), "clusters": len(centroids), "sha256": sha}
        picked = np.unique(nearest_by_inner_product(self.targets, centroids, self.config.device))
        candidates = alive & caption
        scored = self.centroids is not None and _scored(pool, made["sha256"])
        made["assigned_by"] = "score --metric centroid" if scored else "select"
        keep = np.zeros_like(alive)
        for i in range(len(pool.paths)):
            lo, hi = int(pool.offsets[i]), int(pool.offsets[i + 1])
            rows = np.flatnonzero(candidates[lo:hi])
            if not len(rows):
                continue
            if scored:
                column = pool.table(i, [CENTROID]).column(CENTROID)
                ids = column.to_numpy(zero_copy_only=False)[rows]
            else:
                x = self._embeddings(pool, i, rows)
                ids = nearest_by_inner_product(x, centroids, self.config.device)
            keep[lo + rows[np.isin(ids, picked)]] = True
        record: dict[str, Any] = {
            "caption_filter": int(np.count_nonzero(candidates)),
            "centroids": made,
            "target_rows": int(len(self.targets)),
            "target_centroids": int(len(picked)),
            "img_key": self.key,
        }
        return keep, record


def _scored(pool: Pool, sha256: str) -> bool:
    """Whether every score file holds a `centroid` column made by `score --metric centroid`
    with the centroid file of this sha256 (its done marker says so)."""
    from mmcurate.data.store import read_done

    for path, stem in zip(pool.paths, pool.stems):
        marker = read_done(path.parent, stem) or {}
        config = marker.get("config") if isinstance(marker.get("config"), dict) else {}
        if config.get("centroids_sha256") != sha256 or CENTROID not in marker.get("metrics", []):
            return False
    return True
