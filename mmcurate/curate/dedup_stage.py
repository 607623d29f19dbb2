"""The SemDeDup stage (SPEC §4): an embedding store -> one float32 `semdedup` value per scored row.

Phases, each resumable, each heavy one on the executor:
1. scan (here): the rows the score stage scores (`validity.valid_rows` over the given npz keys),
   stem by stem from memory maps; nothing is written, so bad options are refused before work;
2. k-means (one work item, in `dedup_kmeans`): spherical FAISS k-means on a seeded sample of
   at most `train` rows;
3. assign (one item per stem, in `dedup_kmeans`): each row's nearest centroid and its cosine;
4. members (here): every row's id grouped by cluster, one memory-mappable file;
5. clusters (items of consecutive clusters): each cluster's rows gathered by id, ordered, and
   each member's largest cosine to an earlier member (`semdedup.earlier_max`);
6. values (here): one `<stem>.npy` per stem, aligned with its valid rows in store order.

Work dir layout (every file atomic; each `.json` marker written after its data):
  centroids.npy/.json   assign/<stem>.npz/.json   members.npy, offsets.npy, members.json
  clusters/<task>.npy/.json   values/<stem>.npy/.json
Markers chain by content: assign markers name the centroids' sha256, the members key hashes
the assign files' sha256, the values key adds the order (`keep`). A phase is redone only when
its marker is missing or names other inputs, so a re-run redoes only what was lost or changed.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmcurate.curate.dedup_kmeans import (
    AssignItem,
    KmeansItem,
    assign_current,
    assign_stem,
    centroids_sha,
    train_kmeans,
)
from mmcurate.curate.dedup_plan import (
    DedupConfig,
    DedupJob,
    current_marker,
    plan_semdedup,
    sha256_hex,
)
from mmcurate.curate.semdedup import (
    earlier_max,
    member_order,
    unit_rows,
)
from mmcurate.data.atomic import atomic_path, read_json_dict, save_npy_atomic, write_json_atomic
from mmcurate.data.store import read_arrays
from mmcurate.engine import Executor, run_stage, summarise
from mmcurate.errors import ShardError


@dataclass(frozen=True)
class ClusterItem:
    """The clusters first..last-1, whose members are rows offsets[first]..offsets[last]-1."""

    name: str
    first: int
    last: int


def _values_paths(work: str | os.PathLike, stem: str) -> tuple[Path, Path]:
    return Path(work, "values", f"{stem}.npy"), Path(work, "values", f"{stem}.json")


def semdedup_values(work_dir: str | os.PathLike, stem: str, key: str | None = None) -> np.ndarray:
    """A stem's semdedup values (float32, aligned with its valid rows in store order);
    ShardError when absent, or when `key` is given and the values were made with other inputs."""
    data, marker = _values_paths(work_dir, stem)
    found = current_marker(data, marker, **({"key": key} if key is not None else {}))
    if found is None:
        raise ShardError(f"{stem}: no current semdedup values in {work_dir}")
    values = np.load(data, allow_pickle=False)
    if values.shape != (found.get("rows"),):
        raise ShardError(f"{stem}: semdedup values hold {values.shape}, marker says {found}")
    return values


# --------------------------------------------------------------------------- work items


def _gather(job: DedupJob, members: np.ndarray) -> np.ndarray:
    """The unit image rows of `members` (structured rows of members.npy), read stem by stem."""
    x = np.empty((len(members), job.dim), dtype=np.float32)
    if not len(members):
        return x
    order = np.lexsort((members["row"], members["stem"]))
    stems = members["stem"][order]
    bounds = np.flatnonzero(np.r_[True, stems[1:] != stems[:-1], True])
    for a, b in zip(bounds[:-1], bounds[1:]):
        at = order[a:b]
        stem = job.stems[stems[a]]
        img = read_arrays(job.store, stem, job.keys[:1])[job.keys[0]]
        x[at] = unit_rows(img[members["row"][at]])
    return x


def dedup_clusters(job: DedupJob, key: str, item: ClusterItem) -> dict:
    """Values of the item's clusters, in members order, saved as one array."""
    offsets = np.load(job.path("offsets.npy"), allow_pickle=False)
    lo, hi = int(offsets[item.first]), int(offsets[item.last])
    members = np.array(np.load(job.path("members.npy"), mmap_mode="r", allow_pickle=False)[lo:hi])
    x = _gather(job, members)
    values = np.empty(hi - lo, dtype=np.float32)
    largest = 0
    for c in range(item.first, item.last):
        a, b = int(offsets[c]) - lo, int(offsets[c + 1]) - lo
        if a == b:
            continue
        part = members[a:b]
        order = member_order(part["cos"], part["uid"], part["gid"], job.keep, (job.seed, c))
        values[a + order] = earlier_max(x[a:b][order], job.block, job.device)
        largest = max(largest, b - a)
    save_npy_atomic(job.path("clusters", f"{item.name}.npy"), values)
    write_json_atomic(job.path("clusters", f"{item.name}.json"), {"key": key, "rows": hi - lo})
    return {"rows": hi - lo, "largest": largest}


def cluster_items(offsets: np.ndarray, task_rows: int) -> list[ClusterItem]:
    """Consecutive clusters grouped into items of at least `task_rows` rows (the last may be
    smaller), named by their first and last cluster."""
    items, first = [], 0
    k = len(offsets) - 1
    for c in range(k):
        if offsets[c + 1] - offsets[first] >= task_rows or c == k - 1:
            items.append(ClusterItem(f"c{first:07d}-{c:07d}", first, c + 1))
            first = c + 1
    return items


# --------------------------------------------------------------------------- members, values


def _members_key(job: DedupJob) -> str:
    """Hash of the settings and every assign file's sha256: what the members depend on."""
    shas = []
    for stem in job.stems:
        marker = read_json_dict(job.path("assign", f"{stem}.json")) or {}
        shas.append(marker.get("sha", ""))
    return sha256_hex(json.dumps([job.signature, shas]).encode())


def _build_members(job: DedupJob, key: str) -> dict:
    """members.npy (each row's stem, row, cosine, uid and global id, grouped by cluster, in
    global id order within one) and offsets.npy (K+1); kept when its marker matches `key`."""
    found = current_marker(job.path("members.npy"), job.path("members.json"), key=key)
    if found and job.path("offsets.npy").exists():
        return found
    offsets = job.offsets
    n = int(offsets[-1])
    cluster = np.empty(n, dtype=np.int32)
    width = 1
    for index, stem in enumerate(job.stems):
        with np.load(job.path("assign", f"{stem}.npz"), allow_pickle=False) as npz:
            cluster[offsets[index] : offsets[index + 1]] = npz["cluster"]
            width = max(width, npz["uid"].dtype.itemsize)
    order = np.argsort(cluster, kind="stable")
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n, dtype=np.int64)
    counts = np.bincount(cluster, minlength=job.clusters)
    dtype = np.dtype([("stem", "<i4"), ("row", "<i8"), ("cos", "<f8"), ("uid", f"S{width}")])
    dtype = np.dtype(dtype.descr + [("gid", "<i8")])
    with atomic_path(job.path("members.npy")) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n,))
        for index, stem in enumerate(job.stems):
            g0, g1 = int(offsets[index]), int(offsets[index + 1])
            at = position[g0:g1]
            with np.load(job.path("assign", f"{stem}.npz"), allow_pickle=False) as npz:
                out["stem"][at] = index
                out["row"][at] = npz["rows"]
                out["cos"][at] = npz["cos"]
                out["uid"][at] = npz["uid"]
            out["gid"][at] = np.arange(g0, g1, dtype=np.int64)
        out.flush()
        del out
    save_npy_atomic(
        job.path("offsets.npy"), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    )
    stats = {
        "key": key,
        "rows": n,
        "clusters": job.clusters,
        "clusters_nonempty": int((counts > 0).sum()),
        "largest_cluster": int(counts.max(initial=0)),
    }
    write_json_atomic(job.path("members.json"), stats)
    return stats


def _write_values(job: DedupJob, key: str, items: list[ClusterItem], stems: list[int]) -> None:
    """Put the cluster items' values back in store order and save the given stems' arrays."""
    offsets = np.load(job.path("offsets.npy"), allow_pickle=False)
    grouped = np.empty(int(offsets[-1]), dtype=np.float32)
    for item in items:
        lo, hi = int(offsets[item.first]), int(offsets[item.last])
        grouped[lo:hi] = np.load(job.path("clusters", f"{item.name}.npy"), allow_pickle=False)
    gid = np.load(job.path("members.npy"), mmap_mode="r", allow_pickle=False)["gid"]
    by_gid = np.empty_like(grouped)
    by_gid[gid] = grouped
    for index in stems:
        g0, g1 = int(job.offsets[index]), int(job.offsets[index + 1])
        data, marker = _values_paths(job.work, job.stems[index])
        save_npy_atomic(data, by_gid[g0:g1])
        write_json_atomic(marker, {"key": key, "rows": g1 - g0})


# --------------------------------------------------------------------------- the stage


def _phase(executor: Executor, fn, items, is_done, desc: str, seconds: dict, summary: dict):
    """Run one executor phase; record its time and failures; True when every item succeeded."""
    start = time.perf_counter()
    outcomes, skipped = run_stage(executor, fn, items, is_done=is_done, desc=desc)
    phase = desc.split()[-1]
    seconds[phase] = round(time.perf_counter() - start, 3)
    totals = summarise(outcomes, skipped)
    summary["work"][phase] = totals["done"]
    summary["failed"].update({f"{phase}:{name}": why for name, why in totals["failed"].items()})
    return not totals["failed"]


def run_semdedup(
    store: str,
    work_dir: str,
    keys: Sequence[str],
    config: DedupConfig,
    executor: Executor,
    device: str | None = None,
) -> dict:
    """SemDeDup values for every scored row of the store, resumable; the end summary.

    `keys` are the npz arrays the score stage checks, the image key first. Values land in
    `values/<stem>.npy` under `work_dir` (read them with `semdedup_values`). Stems that
    cannot be read, or whose dim differs from the store's, are listed in `failed` and left out;
    a failed phase leaves every stem without values, and the next run resumes from it.
    """
    start = time.perf_counter()
    job, scanned, failed = plan_semdedup(store, work_dir, keys, config, device)
    seconds = {"scan": round(time.perf_counter() - start, 3)}
    skipped: dict[str, int] = {}
    for s in scanned:
        for reason, count in s["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    summary: dict[str, Any] = {
        "rows": int(job.offsets[-1]),
        "read": sum(s["read"] for s in scanned),
        "skipped": dict(sorted(skipped.items())),
        "stems": len(job.stems),
        "failed": dict(failed),
        "done": [],
        "already_done": [],
        "work": {},
        "signature": job.signature,
        "seconds": seconds,
    } | {k: v for k, v in asdict(config).items() if k != "clusters"}
    summary["clusters"] = job.clusters
    os.makedirs(job.work, exist_ok=True)
    if job.clusters == 0:
        key = sha256_hex(json.dumps([job.signature, job.keep]).encode())
        todo = [i for i in range(len(job.stems)) if not _values_current(job, key, i)]
        for index in todo:
            data, marker = _values_paths(job.work, job.stems[index])
            save_npy_atomic(data, np.empty(0, dtype=np.float32))
            write_json_atomic(marker, {"key": key, "rows": 0})
        return _finish(summary, job, key, todo, start)
    ok = _phase(
        executor,
        functools.partial(train_kmeans, job),
        [KmeansItem("kmeans")],
        lambda item: centroids_sha(job) is not None,
        "semdedup kmeans",
        seconds,
        summary,
    )
    summary["train_rows"] = min(job.train, int(job.offsets[-1]))
    if not ok:
        return _finish(summary, job, None, [], start)
    sha_c = centroids_sha(job)
    items = [AssignItem(stem, i, stem) for i, stem in enumerate(job.stems)]
    ok = _phase(
        executor,
        functools.partial(assign_stem, job),
        items,
        functools.partial(assign_current, job, sha_c),
        "semdedup assign",
        seconds,
        summary,
    )
    if not ok:
        return _finish(summary, job, None, [], start)
    t0 = time.perf_counter()
    members_key = _members_key(job)
    stats = _build_members(job, members_key)
    seconds["members"] = round(time.perf_counter() - t0, 3)
    summary.update({k: v for k, v in stats.items() if k not in ("key", "rows")})
    key = sha256_hex(json.dumps([members_key, job.keep]).encode())
    todo = [i for i in range(len(job.stems)) if not _values_current(job, key, i)]
    if todo:
        items = cluster_items(np.load(job.path("offsets.npy"), allow_pickle=False), job.task_rows)
        summary["tasks"] = len(items)
        ok = _phase(
            executor,
            functools.partial(dedup_clusters, job, key),
            items,
            lambda item: (
                current_marker(
                    job.path("clusters", f"{item.name}.npy"),
                    job.path("clusters", f"{item.name}.json"),
                    key=key,
                )
                is not None
            ),
            "semdedup clusters",
            seconds,
            summary,
        )
        if not ok:
            return _finish(summary, job, None, [], start)
        t0 = time.perf_counter()
        _write_values(job, key, items, todo)
        seconds["values"] = round(time.perf_counter() - t0, 3)
    return _finish(summary, job, key, todo, start)


def _values_current(job: DedupJob, key: str, index: int) -> bool:
    data, marker = _values_paths(job.work, job.stems[index])
    return current_marker(data, marker, key=key, rows=job.counts[index]) is not None


def _finish(summary: dict, job: DedupJob, key: str | None, todo: list[int], start: float) -> dict:
    """The summary's last fields: which stems were written now, which were already current."""
    if key is not None:
        summary["key"] = key
        summary["done"] = [job.stems[i] for i in todo]
        summary["already_done"] = [s for i, s in enumerate(job.stems) if i not in set(todo)]
    summary["seconds"]["total"] = round(time.perf_counter() - start, 3)
    return summary
