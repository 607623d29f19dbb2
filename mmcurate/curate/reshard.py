"""Reshard (SPEC §5): write a subset's samples, each once, with their original files, as new tars.

Two steps. Each source shard is filtered on the engine into a part (`<out>/.parts/<stem>.tar`
plus an index of its uids, keys and member counts, then a done marker). A sample with an
unsafe member name or a link member is skipped and counted, never copied. A sequential packing
step then streams the parts in source order into `NNNNN.tar` shards of `shard_size` samples,
keeping the first occurrence of every uid, in img2dataset's layout: each shard with its
`NNNNN.parquet` and `NNNNN_stats.json`, and `sizes.json` for open_clip. Re-runs skip finished
parts, and skip the packing when `reshard.json` records the same subset, sources and shard
size as complete.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmcurate.data.atomic import read_json_dict, save_npy_atomic, save_npz_atomic, write_json_atomic
from mmcurate.data.markers import FILES, sizes_ok, vouch
from mmcurate.data.shard_writer import (
    SIZES,
    STATS_SUFFIX,
    metadata_row,
    shard_name,
    shard_writer,
    write_shard_metadata,
    write_sizes,
)
from mmcurate.data.shards import ShardItem, copy_problem, iter_samples, shard_items
from mmcurate.data.subset import load_subset
from mmcurate.data.uid import (
    UID_DTYPE,
    difference_pairs,
    first_occurrence,
    sort_unique_pairs,
    uid_examples,
)
from mmcurate.engine import Executor, run_stage, summarise
from mmcurate.errors import UsageError

PARTS = ".parts"
MANIFEST = "reshard.json"
NOT_FOUND = "not_found.npy"
_OUTPUT_NAME = re.compile(rf"^[0-9]{{5,}}(\.tar|\.parquet|{STATS_SUFFIX})$")


@dataclass(frozen=True)
class ReshardConfig:
    """Options of `mmcurate reshard`: samples per output shard."""

    shard_size: int = 10000


@dataclass(frozen=True)
class PartJob:
    """What every filtering task shares: where parts go, the subset copy and its fingerprint."""

    parts: str
    subset: str
    fingerprint: str


def subset_fingerprint(subset: np.ndarray) -> str:
    """A digest of a normalised subset, so parts made for another subset are never reused."""
    return hashlib.blake2b(np.ascontiguousarray(subset).view(np.uint8), digest_size=16).hexdigest()


def _in_subset(subset: np.ndarray, uid: str) -> bool:
    """Binary search of a sorted (u8, u8) array, which may be memory-mapped."""
    query = np.array([(int(uid[:16], 16), int(uid[16:32], 16))], dtype=UID_DTYPE)
    i = int(np.searchsorted(subset, query)[0])
    return i < len(subset) and subset[i] == query[0]


def _part_paths(parts: Path, stem: str) -> dict[str, Path]:
    return {
        "tar": parts / f"{stem}.tar",
        "index": parts / f"{stem}.index.npz",
        "done": parts / f"{stem}.done.json",
    }


def filter_shard(job: PartJob, item: ShardItem) -> dict:
    """Engine work item: copy one source shard's subset samples (first occurrence) into a part."""
    paths = _part_paths(Path(job.parts), item.name)
    subset = np.load(job.subset, mmap_mode="r", allow_pickle=False)
    uids: list[str] = []
    keys: list[str] = []
    members: list[int] = []
    seen: set[str] = set()
    read = duplicates = not_selected = 0
    skipped: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    with shard_writer(paths["tar"]) as write:
        for sample in iter_samples(item.url):
            read += 1
            sources[sample["uid_source"]] += 1
            uid = sample["uid"]
            problem = copy_problem(sample)
            if problem:
                skipped[problem] += 1
                continue
            if not _in_subset(subset, uid):
                not_selected += 1
                continue
            if uid in seen:
                duplicates += 1
                continue
            seen.add(uid)
            write(sample["key"], sample["files"])
            uids.append(uid)
            keys.append(sample["key"])
            members.append(len(sample["files"]))
    pairs = np.empty(len(uids), dtype=UID_DTYPE)
    pairs["f0"] = [int(u[:16], 16) for u in uids]
    pairs["f1"] = [int(u[16:32], 16) for u in uids]
    save_npz_atomic(
        paths["index"],
        {
            "uids": pairs,
            "keys": np.array(keys, dtype=str) if keys else np.empty(0, dtype="<U1"),
            "members": np.array(members, dtype=np.int64),
        },
    )
    stats = {
        "rows": len(uids),
        "read": read,
        "duplicates": duplicates,
        "not_selected": not_selected,
        "skipped": dict(sorted(skipped.items())),
        "uid_sources": dict(sorted(sources.items())),
    }
    write_json_atomic(paths["done"], {**stats, "url": item.url, "fingerprint": job.fingerprint})
    return stats


def part_is_done(job: PartJob, item: ShardItem) -> bool:
    """A part is reusable when its marker names the same source and subset."""
    paths = _part_paths(Path(job.parts), item.name)
    try:
        done = json.loads(paths["done"].read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(done, dict)
        and done.get("url") == item.url
        and done.get("fingerprint") == job.fingerprint
        and "uid_sources" in done
        and paths["tar"].is_file()
        and paths["index"].is_file()
    )


def _read_index(parts: Path, stem: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
    with np.load(_part_paths(parts, stem)["index"], allow_pickle=False) as npz:
        return {k: npz[k] for k in keys}


def _part_samples(
    parts: Path, stem: str, index: dict[str, np.ndarray], keep: np.ndarray
) -> Iterator[tuple[str, str, list[tuple[str, bytes]]]]:
    """Stream a part's samples as (key, uid hex, [(ext, bytes)]), only those flagged in keep."""
    with tarfile.open(_part_paths(parts, stem)["tar"], "r:") as tar:
        members = iter(tar)
        for j, count in enumerate(index["members"]):
            key = str(index["keys"][j])
            entries = [next(members) for _ in range(int(count))]
            if keep[j]:
                files = [(m.name[len(key) + 1 :], tar.extractfile(m).read()) for m in entries]
                pair = index["uids"][j]
                yield key, f"{int(pair['f0']):016x}{int(pair['f1']):016x}", files


def _close_shard(stack: ExitStack, out: Path, name: str, rows: list[dict]) -> int:
    """Finish a shard's tar, then write its img2dataset parquet and stats; its sample count."""
    stack.close()
    write_shard_metadata(out, name, rows)
    return len(rows)


def _write_shards(
    out: Path, samples: Iterator[tuple[str, str, list[tuple[str, bytes]]]], shard_size: int
) -> tuple[dict[str, int], int]:
    """Write `NNNNN.tar` shards of shard_size samples atomically, each with its parquet and
    stats; returns ({shard file name: samples}, keys renamed)."""
    sizes: dict[str, int] = {}
    renamed = 0
    stack: ExitStack | None = None
    used: set[str] = set()
    rows: list[dict] = []
    name = ""
    try:
        for key, uid, files in samples:
            if stack is None:
                stack, name, used, rows = ExitStack(), shard_name(len(sizes)), set(), []
                write = stack.enter_context(shard_writer(out / f"{name}.tar"))
            if key in used:
                key = f"{key}_{uid}"
                renamed += 1
            used.add(key)
            write(key, dict(files))
            rows.append(metadata_row(key, uid, dict(files)))
            if len(rows) == shard_size:
                finished, stack = stack, None
                sizes[f"{name}.tar"] = _close_shard(finished, out, name, rows)
        if stack is not None:
            finished, stack = stack, None
            sizes[f"{name}.tar"] = _close_shard(finished, out, name, rows)
    except BaseException:
        if stack is not None:
            stack.__exit__(*sys.exc_info())
        raise
    return sizes, renamed


def _outputs(out: Path, tar_name: str) -> list[Path]:
    """An output shard's files: the tar, its parquet and its stats."""
    stem = tar_name.removesuffix(".tar")
    return [out / tar_name, out / f"{stem}.parquet", out / f"{stem}{STATS_SUFFIX}"]


def _outputs_present(out: Path, tar_name: str) -> bool:
    return all(p.is_file() for p in _outputs(out, tar_name))


def _sum_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for c in counts:
        total.update({k: int(v) for k, v in c.items()})
    return dict(sorted(total.items()))


def _read_manifest(out: Path) -> dict:
    return read_json_dict(out / MANIFEST) or {}


def pack_parts(
    parts: Path, stems: Sequence[str], out: Path, shard_size: int
) -> tuple[list[str], dict[str, Any], np.ndarray]:
    """Pack finished parts, in source order, into output shards; first occurrence of a uid wins."""
    part_uids = [_read_index(parts, s, ["uids"])["uids"] for s in stems]
    all_uids = np.concatenate(part_uids or [np.empty(0, UID_DTYPE)])
    keep = first_occurrence(all_uids)
    bounds = np.cumsum([len(u) for u in part_uids])[:-1]
    keeps = np.split(keep, bounds) if part_uids else []

    def samples() -> Iterator[tuple[str, str, list[tuple[str, bytes]]]]:
        for stem, k in zip(stems, keeps):
            index = _read_index(parts, stem, ["uids", "keys", "members"])
            yield from _part_samples(parts, stem, index, k)

    sizes, renamed = _write_shards(out, samples(), shard_size)
    write_sizes(out, sizes)
    stats = {
        "written": sum(sizes.values()),
        "duplicates_across_shards": int(len(keep) - keep.sum()),
        "renamed_keys": renamed,
    }
    return list(sizes), stats, sort_unique_pairs(all_uids[keep])


def reshard(
    sources: Sequence[str],
    subset: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: ReshardConfig,
    executor: Executor,
) -> dict[str, Any]:
    """Write the subset's samples from the source shards into out_dir; returns the summary.
    Its tasks copy bytes, so they run on `executor.cpu_only()` (no GPU held on Ray)."""
    shard_size = config.shard_size
    if shard_size < 1:
        raise UsageError(f"--shard-size must be at least 1, got {shard_size}")
    items = shard_items(sources)
    for item in items:
        if "://" not in item.url and os.path.isdir(item.url):
            raise UsageError(f"reshard reads webdataset tars; {item.url} is a directory")
    urls = [item.url for item in items]
    wanted = load_subset(subset)
    fingerprint = subset_fingerprint(wanted)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out must be a directory, {out} is a file")
    parts = out / PARTS
    config = {"fingerprint": fingerprint, "sources": urls, "shard_size": shard_size}

    previous = _read_manifest(out)
    if (
        previous.get("complete")
        and all(previous.get(k) == v for k, v in config.items())
        and (out / SIZES).is_file()
        and all(_outputs_present(out, str(n)) for n in previous.get("shards", []))
        and sizes_ok(previous, out)
    ):
        return {**previous, "already_complete": True}

    job = PartJob(str(parts), str(parts / "subset.npy"), fingerprint)
    save_npy_atomic(job.subset, wanted)
    outcomes, skipped = run_stage(
        executor.cpu_only(),
        functools.partial(filter_shard, job),
        items,
        is_done=functools.partial(part_is_done, job),
        desc="reshard: filtering shards",
        count_key="read",
    )
    stage = summarise(outcomes, skipped)
    finished = [it.name for it in items if part_is_done(job, it)]
    names, pack_stats, found = pack_parts(parts, finished, out, shard_size)
    missing = difference_pairs(wanted, found)
    markers = [json.loads(_part_paths(parts, s)["done"].read_text()) for s in finished]

    summary: dict[str, Any] = {
        **config,
        "subset": str(subset),
        "subset_size": int(len(wanted)),
        "shards": names,
        "read": sum(int(m["read"]) for m in markers),
        "matched": sum(int(m["rows"]) for m in markers),
        "not_selected": sum(int(m["not_selected"]) for m in markers),
        "skipped": _sum_counts(m["skipped"] for m in markers),
        "uid_sources": _sum_counts(m["uid_sources"] for m in markers),
        "duplicates_within_shards": sum(int(m["duplicates"]) for m in markers),
        **pack_stats,
        "not_found": int(len(missing)),
        "not_found_examples": uid_examples(missing),
        "done": stage["done"],
        "already_done": stage["already_done"],
        "failed": stage["failed"],
        "complete": not stage["failed"],
    }
    if len(missing):
        save_npy_atomic(out / NOT_FOUND, missing)
    elif (out / NOT_FOUND).is_file():
        (out / NOT_FOUND).unlink()
    summary[FILES] = vouch([p for n in names for p in _outputs(out, n)] + [out / SIZES], out)
    write_json_atomic(out / MANIFEST, summary)
    for stale in set(previous.get("shards", [])) - set(names):
        for path in _outputs(out, str(stale)):
            if _OUTPUT_NAME.match(path.name):
                path.unlink(missing_ok=True)
    if summary["complete"]:
        shutil.rmtree(parts)
    return summary
