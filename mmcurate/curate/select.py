"""Selection over score sidecars (SPEC §5): chained --keep rules, then subset algebra."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmcurate.curate.normsim_d import normsim_d_stage
from mmcurate.curate.pool import find_sidecars, read_pool, sidecar_rows, sidecar_stem
from mmcurate.curate.rules import NORMSIM_D, apply_rule, parse_rule
from mmcurate.data.subset import load_subset, write_subset
from mmcurate.data.uid import UID_DTYPE, intersect_pairs, sort_unique_pairs, union_pairs
from mmcurate.errors import UsageError

DEFAULT_RECIPE = ("negclip:0.3", "normsim_inf:0.2")


@dataclass(frozen=True)
class SelectConfig:
    """Options of `mmcurate select`: the --keep rules in order (none: DEFAULT_RECIPE), subset
    files to combine, and the store, image key (None: detected), iterations and seed of a
    NormSim-D stage."""

    keep: tuple[str, ...] = ()
    union: tuple[str, ...] = ()
    intersect: tuple[str, ...] = ()
    store: str | None = None
    img_key: str | None = None
    normsim_d_iters: int = 500
    seed: int = 0


def select(
    scores_dir: str | os.PathLike | None, config: SelectConfig, progress: bool = True
) -> tuple[np.ndarray, dict]:
    """Run the --keep stages, then (result ∪ unions) ∩ intersects; returns (subset, report)."""
    rules, store, seed = config.keep, config.store, config.seed
    if scores_dir is None and rules:
        raise UsageError("--keep needs a SCORES directory")
    if scores_dir is None and not config.union:
        raise UsageError("give a SCORES directory or at least one --union subset file")
    parsed = [parse_rule(r) for r in (rules or (DEFAULT_RECIPE if scores_dir else ()))]
    if config.normsim_d_iters < 1:
        raise UsageError("--normsim-d-iters must be at least 1")
    uses_d = any(r.metric == NORMSIM_D for r in parsed)
    if uses_d and store is None:
        raise UsageError("--keep normsim_d needs --store STORE (the embedding store)")
    if scores_dir is not None:
        paths = find_sidecars(scores_dir)
        metrics = list(dict.fromkeys(r.metric for r in parsed if r.metric != NORMSIM_D))
        rows = sidecar_rows(paths, metrics)
        if uses_d:
            from mmcurate.data.store import detect_keys, finished_stems

            img_key = config.img_key or detect_keys(store, need_txt=False)[0]
            absent = sorted({sidecar_stem(p) for p in paths} - set(finished_stems(store)))
            if absent:
                raise UsageError(
                    f"store {store} lacks stem(s) of the scores: {', '.join(absent[:5])}"
                )
    union_sets = [(str(p), load_subset(p)) for p in config.union]
    intersect_sets = [(str(p), load_subset(p)) for p in config.intersect]
    report: dict[str, Any] = {"scores": None, "pool": 0, "stages": [], "seed": seed}

    selected = np.empty(0, dtype=UID_DTYPE)
    if scores_dir is not None:
        pool = read_pool(paths, metrics, rows, progress)
        n = len(pool.pairs)
        survivors = np.arange(n)
        for rule in parsed:
            if rule.metric == NORMSIM_D:
                survivors, record = normsim_d_stage(
                    rule, pool, survivors, store, img_key, config.normsim_d_iters, seed
                )
            else:
                survivors, record = apply_rule(
                    rule, pool.scores[rule.metric], pool.pairs, survivors, n
                )
            report["stages"].append(record)
        selected = sort_unique_pairs(pool.pairs[survivors])
        report.update(
            scores=str(scores_dir),
            sidecars=len(paths),
            pool=n,
            selected=int(len(selected)),
            duplicate_uids=int(len(survivors) - len(selected)),
        )
        if uses_d:
            report.update(store=str(store), img_key=img_key, normsim_d_iters=config.normsim_d_iters)

    result = union_pairs(selected, *(s for _, s in union_sets))
    report["union"] = [{"path": p, "count": int(len(s))} for p, s in union_sets]
    report["after_union"] = int(len(result))
    for _, s in intersect_sets:
        result = intersect_pairs(result, s)
    report["intersect"] = [{"path": p, "count": int(len(s))} for p, s in intersect_sets]
    report["count"] = int(len(result))
    return result, report


def run_select(
    scores_dir: str | os.PathLike | None,
    out: str | os.PathLike,
    config: SelectConfig,
    progress: bool = True,
) -> dict:
    """Select and write `out` (subset.npy) with its subset.json record; returns the record."""
    subset, report = select(scores_dir, config, progress)
    write_subset(out, subset, report)
    return {**report, "subset": str(Path(out))}
