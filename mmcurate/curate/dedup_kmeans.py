"""SemDeDup's clustering phases: spherical k-means on a seeded sample (one work item), then
each stem's rows assigned to their nearest centroid (one item per stem), both resumable."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmcurate.curate.dedup_plan import DedupJob, current_marker, sha256_hex, stem_rows
from mmcurate.curate.semdedup import nearest_centroid, train_centroids, unit_rows
from mmcurate.data.atomic import save_npy_atomic, save_npz_atomic, write_json_atomic
from mmcurate.errors import ShardError

READ_BLOCK = 65536  # rows read and assigned at a time


@dataclass(frozen=True)
class KmeansItem:
    """The one k-means work item."""

    name: str


@dataclass(frozen=True)
class AssignItem:
    """Assign one stem's rows to their nearest centroid."""

    name: str
    index: int
    stem: str


def train_kmeans(job: DedupJob, item: KmeansItem) -> dict:
    """Draw the seeded training sample, read it stem by stem, train and save the centroids."""
    n = int(job.offsets[-1])
    m = min(job.train, n)
    sample = np.sort(np.random.default_rng(job.seed).choice(n, m, replace=False))
    x = np.empty((m, job.dim), dtype=np.float32)
    bounds = np.searchsorted(sample, job.offsets)
    for index in range(len(job.stems)):
        lo, hi = bounds[index], bounds[index + 1]
        if lo < hi:
            _, img, valid = stem_rows(job, index)
            x[lo:hi] = unit_rows(img[valid[sample[lo:hi] - job.offsets[index]]])
    centroids = train_centroids(x, job.clusters, iterations=job.iterations, seed=job.seed)
    del x
    save_npy_atomic(job.path("centroids.npy"), centroids)
    sha = sha256_hex(job.path("centroids.npy").read_bytes())
    write_json_atomic(
        job.path("centroids.json"), {"signature": job.signature, "sha": sha, "rows": m}
    )
    return {"rows": m}


def centroids_sha(job: DedupJob) -> str | None:
    """The sha256 of the current centroids, or None when they must be (re)trained."""
    found = current_marker(
        job.path("centroids.npy"), job.path("centroids.json"), signature=job.signature
    )
    return found["sha"] if found else None


def assign_stem(job: DedupJob, item: AssignItem) -> dict:
    """Each scored row of a stem: its row, nearest centroid, cosine to it, and uid bytes."""
    sha_c = centroids_sha(job)
    if sha_c is None:
        raise ShardError(f"{item.stem}: no current centroids in {job.work}")
    centroids = np.load(job.path("centroids.npy"), allow_pickle=False)
    uids, img, valid = stem_rows(job, item.index)
    cluster = np.empty(len(valid), dtype=np.int32)
    cos = np.empty(len(valid), dtype=np.float64)
    for r0 in range(0, len(valid), READ_BLOCK):
        rows = valid[r0 : r0 + READ_BLOCK]
        cluster[r0 : r0 + len(rows)], cos[r0 : r0 + len(rows)] = nearest_centroid(
            unit_rows(img[rows]), centroids
        )
    uid_bytes = np.array([uids[r].encode() for r in valid], dtype=bytes)
    arrays = {"rows": valid.astype(np.int64), "cluster": cluster, "cos": cos, "uid": uid_bytes}
    data = job.path("assign", f"{item.stem}.npz")
    save_npz_atomic(data, arrays)
    marker = {"signature": job.signature, "centroids": sha_c, "sha": sha256_hex(data.read_bytes())}
    write_json_atomic(job.path("assign", f"{item.stem}.json"), marker | {"rows": len(valid)})
    return {"rows": len(valid)}


def assign_current(job: DedupJob, sha_c: str | None, item: AssignItem) -> bool:
    """Whether a stem's assignment is done and made from the centroids with sha `sha_c`."""
    data, marker = job.path("assign", f"{item.stem}.npz"), job.path("assign", f"{item.stem}.json")
    return current_marker(data, marker, signature=job.signature, centroids=sha_c) is not None
