"""The `score` stage: embedding store -> `<stem>.scores.parquet` sidecars, one window per work item.

Bad input (SPEC §9):
- a row whose image or text embedding holds NaN/Inf, a row with a null uid, or a repeated uid
  within a stem is skipped: it gets no row in the sidecar and is counted by reason
  (`nonfinite_embedding`, `missing_uid`, `duplicate_uid`) in the stem's done marker, so
  `read == rows + sum(skipped)` for every stem;
- a stem that cannot be read, whose parquet and npz differ in length, whose uid column is not
  strings, or whose embedding dim does not match the target, its other modality or the rest of
  its window (the dim most of its stems have) fails alone; the rest of its window is scored,
  the window is then not done and is redone on the next run. A window whose every stem fails is
  a failed work item.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from mmcurate.curate.centroids import CENTROID, cached_centroids, nearest_by_inner_product
from mmcurate.curate.dedup_stage import run_semdedup, semdedup_values
from mmcurate.curate.lang import (
    LANG,
    LANG_CLD3,
    STRING_COLUMNS,
    cld3_lang,
    decode_captions,
    fasttext_lang,
    read_captions,
)
from mmcurate.curate.normsim import MaxAbsIndex, estimate_recall, gram, normsim_2, normsim_p
from mmcurate.curate.precision import resolve_precision
from mmcurate.curate.rows import torch_device
from mmcurate.curate.score_config import (
    ScoreConfig,
    ScoreJob,
    normsim_column,
    resolve_score,
)
from mmcurate.curate.scores import clipscore, negclip_batch_count, negclip_scores
from mmcurate.curate.targets import cached_derived, cached_target
from mmcurate.curate.validity import valid_rows
from mmcurate.curate.windows import WindowItem, WindowRows, window_is_done, window_items
from mmcurate.data.atomic import write_json_atomic, write_parquet_atomic
from mmcurate.data.markers import FILES, vouch
from mmcurate.data.store import done_path, read_stem
from mmcurate.engine import Executor, report_progress, run_stage, summarise
from mmcurate.errors import ShardError

RECALL_QUERIES = 1000
DEDUP_SUMMARY = ("clusters", "keep", "train", "train_rows", "tasks", "seconds")


def _gram(job: ScoreJob) -> np.ndarray:
    return cached_derived(job.targets, job.img_key, "gram", gram)


def _index(job: ScoreJob) -> MaxAbsIndex:
    kind = job.normsim_index
    build = functools.partial(MaxAbsIndex, kind=kind, seed=job.seed)
    return cached_derived(job.targets, job.img_key, f"index:{kind}", build)


# --------------------------------------------------------------------------- one window


def _open_stem(job: ScoreJob, stem: str, keys: list[str]) -> tuple[Any, dict, int]:
    """A stem's uid table, arrays and dim, or ShardError naming what is wrong."""
    import pyarrow as pa

    columns = ("uid", "caption") if job.lang_metrics else ("uid",)
    if keys:
        meta, arrays = read_stem(job.store, stem, keys, columns=columns)
    else:  # caption metrics only: two parquet columns are read, the npz is never opened
        meta, arrays = read_captions(job.store, stem), {}
    uid_type = meta.schema.field("uid").type
    if not (pa.types.is_string(uid_type) or pa.types.is_large_string(uid_type)):
        raise ShardError(f"{stem}: uid column has type {uid_type}, expected strings")
    dims = {k: arrays[k].shape[1] for k in keys}
    dim = dims.get(job.img_key, 0)
    if job.target_shape and dim != job.target_shape[1]:
        raise ShardError(
            f"{stem}: embedding dim {dim} does not match target dim {job.target_shape[1]}"
        )
    if len(set(dims.values())) > 1:
        raise ShardError(f"{stem}: embedding dims differ between arrays {dims}")
    return meta, arrays, dim


def _window_dim(dims: list[int]) -> int:
    """The dim most of the window's stems have (the earliest at a tie); the others fail."""
    return max(dict.fromkeys(dims), key=lambda d: (dims.count(d), -dims.index(d)), default=0)


def score_window(job: ScoreJob, item: WindowItem) -> dict:
    """Score one window and write its sidecars, then its done markers (the engine's work fn)."""
    start = time.perf_counter()
    keys = job.keys
    failed: dict[str, str] = {}
    stems: list[dict] = []
    for stem in item.stems:
        try:
            meta, arrays, dim = _open_stem(job, stem, keys)
        except ShardError as exc:
            failed[stem] = str(exc)
            continue
        uid_col = meta.column("uid")
        valid, skipped = valid_rows(uid_col.to_pylist(), [arrays[k] for k in keys])
        try:
            dedup = _semdedup(job, stem, len(valid))
        except ShardError as exc:
            failed[stem] = str(exc)
            continue
        stems.append(
            {
                "stem": stem,
                "arrays": arrays,
                "dim": dim,
                "uids": uid_col,
                "valid": valid,
                "skipped": skipped,
                "read": meta.num_rows,
                "semdedup": dedup,
                "lang": _lang_columns(job, meta, valid),
            }
        )
    dim = _window_dim([s["dim"] for s in stems])
    for s in [s for s in stems if s["dim"] != dim]:
        failed[s["stem"]] = f"{s['stem']}: embedding dim {s['dim']} differs from its window's {dim}"
        stems.remove(s)
    if not stems:
        if len(failed) == 1:
            raise ShardError(next(iter(failed.values())))
        raise ShardError(f"all {len(failed)} stems failed; first: {next(iter(failed.values()))}")
    views = {key: WindowRows([(s["arrays"][key], s["valid"]) for s in stems], dim) for key in keys}
    img = views.get(job.img_key)
    offsets = np.concatenate([[0], np.cumsum([len(s["valid"]) for s in stems])]).astype(np.int64)
    columns: dict[str, np.ndarray] = {}
    recall = None
    precision, _ = resolve_precision(job.precision, torch_device(job.device))
    if "clipscore" in job.metrics:
        columns["clipscore"] = clipscore(img, views[job.txt_key])
    if "negclip" in job.metrics:
        columns["negclip"] = negclip_scores(
            img,
            views[job.txt_key],
            tau=job.tau,
            batch_size=job.batch_size,
            k=job.k,
            seed=(job.seed, item.index),
            device=job.device,
            precision=precision,
            on_batch=_batch_reporter(negclip_batch_count(len(img), job.batch_size, job.k)),
        )
    for p in job.ps:
        if p == 2:
            values = normsim_2(img, _gram(job), device=job.device)
        elif math.isinf(p):
            index = _index(job)
            values = index.search(img)
            if job.normsim_index != "flat" and len(img):
                rng = np.random.default_rng([job.seed, item.index])
                sample = np.sort(rng.choice(len(img), min(RECALL_QUERIES, len(img)), False))
                targets = cached_target(job.targets, job.img_key)
                recall = estimate_recall(index, targets, img[sample])
        else:
            values = normsim_p(img, cached_target(job.targets, job.img_key), p, device=job.device)
        columns[normsim_column(p)] = values
    if job.dedup:
        columns["semdedup"] = np.concatenate([s["semdedup"] for s in stems])
    if job.centroids:
        centroids = cached_centroids(job.centroids, job.centroids_sha256)
        if centroids.shape[1] != dim:
            raise ShardError(f"centroids have width {centroids.shape[1]}, embeddings have {dim}")
        columns[CENTROID] = nearest_by_inner_product(img, centroids, job.device)
    _write_window(job, item, stems, columns, offsets, recall, precision)
    stats: dict[str, Any] = {
        "rows": int(offsets[-1]),
        "read": int(sum(s["read"] for s in stems)),
        "skipped": _sum_reasons(s["skipped"] for s in stems),
        "stems": len(stems),
        "failed_stems": failed,
        "precision": precision,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if recall is not None:
        stats["recall"] = recall
    return stats


def _semdedup(job: ScoreJob, stem: str, rows: int) -> np.ndarray | None:
    """The stem's semdedup values from this run's SemDeDup stage, aligned with its valid rows."""
    if not job.dedup:
        return None
    if job.dedup_key is None:
        raise ShardError(f"{stem}: semdedup did not finish (see the summary's semdedup/ failures)")
    values = semdedup_values(job.dedup_dir, stem, job.dedup_key)
    if len(values) != rows:
        raise ShardError(f"{stem}: {len(values)} semdedup values for {rows} valid rows")
    return values


def _lang_columns(job: ScoreJob, meta, valid: np.ndarray) -> dict[str, Any]:
    """The stem's caption-metric columns (lang, lang_score, lang_cld3) over its valid rows."""
    if not job.lang_metrics:
        return {}
    captions = decode_captions(meta.column("caption").take(valid))
    out: dict[str, Any] = {}
    if LANG in job.metrics:
        out["lang"], out["lang_score"] = fasttext_lang(captions, job.lang_model)
    if LANG_CLD3 in job.metrics:
        out["lang_cld3"] = cld3_lang(captions)
    return out


def _batch_reporter(total: int):
    """Reports the window's progress after each negclip batch (the bar moves within a window)."""
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        report_progress(done / max(total, 1), final=done == total)

    return tick


def _sum_reasons(dicts) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for reason, count in d.items():
            total[reason] = total.get(reason, 0) + int(count)
    return total


def _write_window(
    job: ScoreJob,
    item: WindowItem,
    stems: list[dict],
    columns: dict[str, np.ndarray],
    offsets: np.ndarray,
    recall: float | None,
    precision: str,
) -> None:
    """Every stem's sidecar first, then every stem's done marker (so a kill redoes the window)."""
    import pyarrow as pa
    import torch

    sig = job.signature()
    for i, s in enumerate(stems):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        data = {"uid": s["uids"].take(pa.array(s["valid"], type=pa.int64()))}
        for name in job.columns:
            values = s["lang"][name] if name in s["lang"] else columns[name][lo:hi]
            kind = pa.string() if name in STRING_COLUMNS else pa.float32()
            kind = pa.int32() if name == CENTROID else kind
            data[name] = pa.array(values, type=kind)
        write_parquet_atomic(Path(job.out) / f"{s['stem']}.scores.parquet", pa.table(data))
    for i, s in enumerate(stems):
        marker = {
            "rows": int(offsets[i + 1] - offsets[i]),
            "read": int(s["read"]),
            "skipped": s["skipped"],
            "metrics": list(job.columns),
            "tau": job.tau,
            "window": item.name,
            "window_stems": item.stems,
            "config": sig,
            "precision": precision,
            "threads": torch.get_num_threads(),
        }
        if recall is not None:
            marker["normsim_inf_recall"] = recall
        if job.lang_model:
            marker["lang_model"] = {"path": job.lang_model, "sha256": job.lang_model_sha256}
        marker[FILES] = vouch([Path(job.out) / f"{s['stem']}.scores.parquet"], job.out)
        write_json_atomic(done_path(job.out, s["stem"]), marker)


# --------------------------------------------------------------------------- the stage


def _one(values: list, default: Any) -> Any:
    """The value every item reported (a sorted list if they differ), else `default`."""
    found = sorted({v for v in values if v is not None})
    return found[0] if len(found) == 1 else (found or default)


def run_score(store: str, out: str, config: ScoreConfig, executor: Executor) -> dict:
    """Score every unfinished window of the store; the end summary (failed windows and stems)."""
    executor.check_device(config.device)
    job = resolve_score(store, out, config, executor.task_device(config.device))
    os.makedirs(job.out, exist_ok=True)
    dedup = None
    if job.dedup:
        dedup = run_semdedup(
            job.store, str(job.dedup_dir), job.keys, job.dedup, executor, device=job.device
        )
        job = dataclasses.replace(job, dedup_key=dedup.get("key"))
    items = window_items(job)
    outcomes, skipped = run_stage(
        executor,
        functools.partial(score_window, job),
        items,
        is_done=functools.partial(window_is_done, job),
        desc="score",
    )
    summary = summarise(outcomes, skipped)
    for o in outcomes:
        for stem, reason in (o.stats.get("failed_stems") or {}).items():
            summary["failed"][f"{o.name}/{stem}"] = reason
    recalls = [o.stats["recall"] for o in outcomes if "recall" in o.stats]
    summary.update(
        {
            "windows": len(items),
            "stems": sum(len(it.stems) for it in items),
            "metrics": list(job.columns),
            "tau": job.tau,
            "tau_source": job.tau_source,
            "batch_size": job.batch_size,
            "k": job.k,
            "window": job.window,
            "seed": job.seed,
            "img_key": job.img_key,
            "txt_key": job.txt_key,
            "precision": _one([o.stats.get("precision") for o in outcomes], job.precision),
            "out": job.out,
        }
    )
    if job.lang_model:
        summary["lang_model"] = {"path": job.lang_model, "sha256": job.lang_model_sha256}
    if job.target_shape:
        summary["target"] = {"paths": list(job.targets), "shape": list(job.target_shape)}
        summary["normsim_index"] = job.normsim_index
    if recalls:
        summary["normsim_inf_recall_min"] = min(recalls)
    if dedup:
        for stem, reason in dedup["failed"].items():
            summary["failed"][f"semdedup/{stem}"] = reason
        summary["semdedup"] = {k: dedup.get(k) for k in DEDUP_SUMMARY}
        summary["semdedup"]["stems_written"] = len(dedup["done"])
    return summary
