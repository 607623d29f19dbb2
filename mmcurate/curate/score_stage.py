"""The `score` stage: embedding store -> `<stem>.scores.parquet` sidecars, one window per work item.

A window is a group of consecutive finished stems holding at least `window` rows (a remainder
smaller than B joins the previous window); negCLIPLoss batches are drawn within a window, so
scores depend only on (embeddings, window grouping, B, K, τ, seed) and not on the executor.

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

import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmcurate.curate.scores import (
    MaxAbsIndex,
    clipscore,
    estimate_recall,
    gram,
    negclip_scores,
    normsim_2,
    normsim_p,
)
from mmcurate.curate.targets import load_target
from mmcurate.data.atomic import write_json_atomic, write_parquet_atomic
from mmcurate.data.store import (
    done_path,
    finished_stems,
    read_done,
    read_stem,
    store_logit_scale,
)
from mmcurate.engine import Executor, run_stage, summarise
from mmcurate.errors import ShardError, UsageError

METRICS = ("clipscore", "negclip", "normsim")
DEFAULT_TAU = 0.01
RECALL_QUERIES = 1000
SCAN_BLOCK = 65536


def parse_p(text: str | float) -> float:
    """A NormSim exponent: a float > 0 or inf."""
    try:
        p = float(text)
    except ValueError:
        raise UsageError(f"--p must be a number > 0 or inf, got {text!r}") from None
    if not p > 0:
        raise UsageError(f"--p must be a number > 0 or inf, got {text!r}")
    return p


def normsim_column(p: float) -> str:
    """Sidecar column of NormSim_p: normsim_2, normsim_inf, normsim_3, normsim_2.5."""
    return "normsim_inf" if math.isinf(p) else f"normsim_{p:g}"


@dataclass(frozen=True)
class ScoreConfig:
    """Everything a window's scores depend on, plus where to read and write."""

    store: str
    out: str
    metrics: tuple[str, ...] = ("clipscore", "negclip")
    ps: tuple[float, ...] = (math.inf,)
    tau: float = DEFAULT_TAU
    tau_source: str = "default"
    batch_size: int = 32768
    k: int = 10
    window: int = 1_048_576
    seed: int = 0
    img_key: str = "img"
    txt_key: str = "txt"
    targets: tuple[str, ...] = ()
    target_shape: tuple[int, int] | None = None
    normsim_index: str = "flat"
    device: str = "auto"
    columns: tuple[str, ...] = field(default=())

    def signature(self) -> dict:
        """The settings a done marker must match for its stem to count as done."""
        sig = {k: v for k, v in asdict(self).items() if k not in ("out", "tau_source", "device")}
        sig["store"] = str(Path(self.store).resolve())
        sig["ps"] = [normsim_column(p) for p in self.ps]
        return json.loads(json.dumps(sig))


def make_config(
    store: str,
    out: str,
    metrics: Sequence[str] = (),
    ps: Sequence[str | float] = (),
    targets: Sequence[str] = (),
    temperature: float | None = None,
    batch_size: int = 32768,
    k: int = 10,
    window: int = 1_048_576,
    seed: int = 0,
    img_key: str = "img",
    txt_key: str = "txt",
    normsim_index: str = "flat",
    device: str = "auto",
) -> ScoreConfig:
    """Validate options (UsageError before any work) and resolve defaults: metrics, p, τ."""
    if not Path(store).is_dir():
        raise UsageError(f"store directory not found: {store}")
    if Path(out).resolve() == Path(store).resolve():
        raise UsageError("--out must differ from the store directory")
    for name, value in (("--batch-size", batch_size), ("--k", k), ("--window", window)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    if temperature is not None and not (temperature > 0 and math.isfinite(temperature)):
        raise UsageError(f"--temperature must be > 0, got {temperature}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise UsageError(f"unknown metric(s) {unknown}: use {', '.join(METRICS)}")
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is available")
    if normsim_index not in ("flat", "ivf", "hnsw"):
        raise UsageError(f"--normsim-index must be flat, ivf or hnsw, got {normsim_index!r}")
    chosen = list(dict.fromkeys(metrics))
    if not chosen:
        chosen = ["clipscore", "negclip"] + (["normsim"] if targets else [])
    if "normsim" in chosen and not targets:
        raise UsageError("--metric normsim needs --target PATH")
    parsed = tuple(dict.fromkeys(parse_p(p) for p in ps)) or (math.inf,)
    if "normsim" not in chosen and (targets or ps):
        warnings.warn("--target and --p are ignored without --metric normsim", stacklevel=2)
    target_paths: tuple[str, ...] = ()
    target_shape = None
    if "normsim" in chosen:
        for t in targets:
            if not Path(t).exists():
                raise UsageError(f"target file not found: {t}")
        target_paths = tuple(str(Path(t).resolve()) for t in targets)
        target_shape = tuple(_target(target_paths, img_key).shape)
    if temperature is not None:
        tau, source = float(temperature), "--temperature"
    else:
        scale = store_logit_scale(store)
        if scale:
            tau, source = 1.0 / scale, f"1/logit_scale recorded in the store ({scale:g})"
        else:
            tau, source = DEFAULT_TAU, "default"
    columns = [m for m in ("clipscore", "negclip") if m in chosen]
    if "normsim" in chosen:
        columns += [normsim_column(p) for p in parsed]
    return ScoreConfig(
        store=str(store),
        out=str(out),
        metrics=tuple(chosen),
        ps=parsed if "normsim" in chosen else (),
        tau=tau if "negclip" in chosen else DEFAULT_TAU,
        tau_source=source if "negclip" in chosen else "unused",
        batch_size=int(batch_size),
        k=int(k),
        window=int(window),
        seed=int(seed),
        img_key=img_key,
        txt_key=txt_key,
        targets=target_paths,
        target_shape=target_shape,
        normsim_index=normsim_index,
        device=device,
        columns=tuple(columns),
    )


# --------------------------------------------------------------------------- windows


def plan_windows(
    counts: Sequence[tuple[str, int]], window: int, batch_size: int
) -> list[list[str]]:
    """Consecutive stems in windows of >= `window` rows; a remainder < B joins the last window."""
    groups: list[list[str]] = []
    current: list[str] = []
    size = 0
    for stem, rows in counts:
        current.append(stem)
        size += rows
        if size >= window:
            groups.append(current)
            current, size = [], 0
    if current:
        if groups and size < batch_size:
            groups[-1].extend(current)
        else:
            groups.append(current)
    return groups


def _row_count(store: str, stem: str) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(Path(store) / f"{stem}.parquet").metadata.num_rows
    except Exception:
        return 0


def window_items(cfg: ScoreConfig) -> list[dict]:
    """The work items: one per window, named `w<index>:<first stem>..<last stem>`."""
    stems = finished_stems(cfg.store)
    if not stems:
        raise UsageError(f"no finished stems in store {cfg.store}")
    counts = [(s, _row_count(cfg.store, s)) for s in stems]
    items = []
    for i, group in enumerate(plan_windows(counts, cfg.window, cfg.batch_size)):
        span = group[0] if len(group) == 1 else f"{group[0]}..{group[-1]}"
        items.append({"name": f"w{i:05d}:{span}", "index": i, "stems": group})
    return items


def window_is_done(cfg: ScoreConfig, item: dict) -> bool:
    """A window is done when every stem has a marker written with these settings and grouping."""
    sig = cfg.signature()
    for stem in item["stems"]:
        marker = read_done(cfg.out, stem)
        if not marker or marker.get("config") != sig or marker.get("window_stems") != item["stems"]:
            return False
    return True


class WindowRows:
    """The valid rows of a window's stems as one lazy (n, d) matrix, gathered as float32."""

    def __init__(self, parts: Sequence[tuple[np.ndarray, np.ndarray]], dim: int) -> None:
        self.parts = list(parts)
        self.offsets = np.concatenate([[0], np.cumsum([len(r) for _, r in self.parts])]).astype(
            np.int64
        )
        self.shape = (int(self.offsets[-1]), dim)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        idx = (
            np.arange(*key.indices(len(self)), dtype=np.int64)
            if isinstance(key, slice)
            else np.asarray(key, dtype=np.int64)
        )
        out = np.empty((idx.size, self.shape[1]), dtype=np.float32)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        bounds = np.searchsorted(sorted_idx, self.offsets)
        for p, (arr, rows) in enumerate(self.parts):
            lo, hi = bounds[p], bounds[p + 1]
            if lo < hi:
                local = rows[sorted_idx[lo:hi] - self.offsets[p]]
                out[order[lo:hi]] = arr[local]
        return out


# --------------------------------------------------------------------------- targets (per process)

_TARGETS: dict[tuple, Any] = {}


def _file_state(path: str) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return (path,)
    return (path, st.st_mtime_ns, st.st_size)


def _target(paths: tuple[str, ...], img_key: str) -> np.ndarray:
    """The loaded target matrix, cached per process (one entry, keyed by the files' state)."""
    key = ("T", tuple(_file_state(p) for p in paths), img_key)
    if key not in _TARGETS:
        _TARGETS.clear()
        _TARGETS[key] = load_target(paths, img_key)
    return _TARGETS[key]


def _target_derived(cfg: ScoreConfig, what: str) -> Any:
    """The Gram matrix or the FAISS index of the target, built once per process."""
    targets = _target(cfg.targets, cfg.img_key)
    key = (what, tuple(_file_state(p) for p in cfg.targets), cfg.img_key, cfg.normsim_index)
    if key not in _TARGETS:
        if what == "gram":
            _TARGETS[key] = gram(targets)
        else:
            _TARGETS[key] = MaxAbsIndex(targets, cfg.normsim_index, seed=cfg.seed)
    return _TARGETS[key]


# --------------------------------------------------------------------------- one window


def _valid_rows(uids: list, arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, dict[str, int]]:
    """Row indices to score, and the skipped rows counted by reason (one reason per row)."""
    n = len(uids)
    finite = np.ones(n, dtype=bool)
    for arr in arrays:
        for r0 in range(0, n, SCAN_BLOCK):
            block = np.asarray(arr[r0 : r0 + SCAN_BLOCK])
            finite[r0 : r0 + SCAN_BLOCK] &= np.isfinite(block).all(axis=1)
    missing = np.array([u is None or u == "" for u in uids], dtype=bool)
    seen: set = set()
    duplicate = np.zeros(n, dtype=bool)
    for i, u in enumerate(uids):
        if missing[i] or not finite[i]:
            continue
        if u in seen:
            duplicate[i] = True
        seen.add(u)
    skipped = {
        "missing_uid": int(missing.sum()),
        "nonfinite_embedding": int((~missing & ~finite).sum()),
        "duplicate_uid": int(duplicate.sum()),
    }
    valid = np.flatnonzero(~missing & finite & ~duplicate)
    return valid, {k: v for k, v in skipped.items() if v}


def _open_stem(cfg: ScoreConfig, stem: str, keys: list[str]) -> tuple[Any, dict, int]:
    """A stem's uid table, arrays and dim, or ShardError naming what is wrong."""
    import pyarrow as pa

    meta, arrays = read_stem(cfg.store, stem, keys, columns=("uid",))
    uid_type = meta.schema.field("uid").type
    if not (pa.types.is_string(uid_type) or pa.types.is_large_string(uid_type)):
        raise ShardError(f"{stem}: uid column has type {uid_type}, expected strings")
    dims = {k: arrays[k].shape[1] for k in keys}
    dim = dims[cfg.img_key]
    if cfg.target_shape and dim != cfg.target_shape[1]:
        raise ShardError(
            f"{stem}: embedding dim {dim} does not match target dim {cfg.target_shape[1]}"
        )
    if len(set(dims.values())) > 1:
        raise ShardError(f"{stem}: embedding dims differ between arrays {dims}")
    return meta, arrays, dim


def _window_dim(dims: list[int]) -> int:
    """The dim most of the window's stems have (the earliest at a tie); the others fail."""
    return max(dict.fromkeys(dims), key=lambda d: (dims.count(d), -dims.index(d)), default=0)


def score_window(cfg: ScoreConfig, item: dict) -> dict:
    """Score one window and write its sidecars, then its done markers (the engine's work fn)."""
    start = time.perf_counter()
    needs_txt = "clipscore" in cfg.metrics or "negclip" in cfg.metrics
    keys = [cfg.img_key] + ([cfg.txt_key] if needs_txt else [])
    failed: dict[str, str] = {}
    stems: list[dict] = []
    for stem in item["stems"]:
        try:
            meta, arrays, dim = _open_stem(cfg, stem, keys)
        except ShardError as exc:
            failed[stem] = str(exc)
            continue
        uid_col = meta.column("uid")
        valid, skipped = _valid_rows(uid_col.to_pylist(), [arrays[k] for k in keys])
        stems.append(
            {
                "stem": stem,
                "arrays": arrays,
                "dim": dim,
                "uids": uid_col,
                "valid": valid,
                "skipped": skipped,
                "read": meta.num_rows,
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
    img = views[cfg.img_key]
    columns: dict[str, np.ndarray] = {}
    recall = None
    if "clipscore" in cfg.metrics:
        columns["clipscore"] = clipscore(img, views[cfg.txt_key])
    if "negclip" in cfg.metrics:
        columns["negclip"] = negclip_scores(
            img,
            views[cfg.txt_key],
            tau=cfg.tau,
            batch_size=cfg.batch_size,
            k=cfg.k,
            seed=(cfg.seed, item["index"]),
            device=cfg.device,
        )
    for p in cfg.ps:
        if p == 2:
            values = normsim_2(img, _target_derived(cfg, "gram"), device=cfg.device)
        elif math.isinf(p):
            index = _target_derived(cfg, "index")
            values = index.search(img)
            if cfg.normsim_index != "flat" and len(img):
                rng = np.random.default_rng([cfg.seed, item["index"]])
                sample = np.sort(rng.choice(len(img), min(RECALL_QUERIES, len(img)), False))
                targets = _target(cfg.targets, cfg.img_key)
                recall = estimate_recall(index, targets, img[sample])
        else:
            values = normsim_p(img, _target(cfg.targets, cfg.img_key), p, device=cfg.device)
        columns[normsim_column(p)] = values
    _write_window(cfg, item, stems, columns, img.offsets, recall)
    stats: dict[str, Any] = {
        "rows": int(len(img)),
        "read": int(sum(s["read"] for s in stems)),
        "skipped": _sum_reasons(s["skipped"] for s in stems),
        "stems": len(stems),
        "failed_stems": failed,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if recall is not None:
        stats["recall"] = recall
    return stats


def _sum_reasons(dicts) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for reason, count in d.items():
            total[reason] = total.get(reason, 0) + int(count)
    return total


def _write_window(
    cfg: ScoreConfig,
    item: dict,
    stems: list[dict],
    columns: dict[str, np.ndarray],
    offsets: np.ndarray,
    recall: float | None,
) -> None:
    """Every stem's sidecar first, then every stem's done marker (so a kill redoes the window)."""
    import pyarrow as pa

    sig = cfg.signature()
    for i, s in enumerate(stems):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        data = {"uid": s["uids"].take(pa.array(s["valid"], type=pa.int64()))}
        for name in cfg.columns:
            data[name] = pa.array(columns[name][lo:hi], type=pa.float32())
        write_parquet_atomic(Path(cfg.out) / f"{s['stem']}.scores.parquet", pa.table(data))
    for i, s in enumerate(stems):
        marker = {
            "rows": int(offsets[i + 1] - offsets[i]),
            "read": int(s["read"]),
            "skipped": s["skipped"],
            "metrics": list(cfg.columns),
            "tau": cfg.tau,
            "window": item["name"],
            "window_stems": item["stems"],
            "config": sig,
        }
        if recall is not None:
            marker["normsim_inf_recall"] = recall
        write_json_atomic(done_path(cfg.out, s["stem"]), marker)


# --------------------------------------------------------------------------- the stage


def run_score(cfg: ScoreConfig, executor: Executor) -> dict:
    """Score every unfinished window; return the end summary (failed windows and stems listed)."""
    import functools

    os.makedirs(cfg.out, exist_ok=True)
    items = window_items(cfg)
    outcomes, skipped = run_stage(
        executor,
        functools.partial(score_window, cfg),
        items,
        is_done=functools.partial(window_is_done, cfg),
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
            "stems": sum(len(it["stems"]) for it in items),
            "metrics": list(cfg.columns),
            "tau": cfg.tau,
            "tau_source": cfg.tau_source,
            "batch_size": cfg.batch_size,
            "k": cfg.k,
            "window": cfg.window,
            "seed": cfg.seed,
            "out": cfg.out,
        }
    )
    if cfg.target_shape:
        summary["target"] = {"paths": list(cfg.targets), "shape": list(cfg.target_shape)}
        summary["normsim_index"] = cfg.normsim_index
    if recalls:
        summary["normsim_inf_recall_min"] = min(recalls)
    return summary
