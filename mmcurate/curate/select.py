"""Selection over score sidecars (SPEC §5): chained --keep rules, then subset algebra."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmcurate.curate.datacomp_rules import DERIVED, derived_values
from mmcurate.curate.image_based import ImageBasedConfig
from mmcurate.curate.normsim_d import normsim_d_stage, parse_memory
from mmcurate.curate.pool import (
    check_store,
    find_sidecars,
    is_metadata,
    open_pool,
    sidecar_rows,
    sidecar_stem,
)
from mmcurate.curate.rules import EQUALS, EXACT, NAMED, NORMSIM_D, TIES, apply_rule, parse_rule
from mmcurate.curate.select_plan import mask_stage, plan_columns
from mmcurate.data.subset import load_subset, write_subset
from mmcurate.data.uid import UID_DTYPE, intersect_pairs, sort_unique_pairs, union_pairs
from mmcurate.embed import DEFAULT_DEVICE
from mmcurate.errors import UsageError

DEFAULT_RECIPE = ("negclip:0.3", "normsim_inf:0.2")


@dataclass(frozen=True)
class SelectConfig:
    """Options of `mmcurate select`: the --keep rules in order (none: DEFAULT_RECIPE), how a
    fraction rule cuts ties (exact count or DataComp's threshold rule), subset files to
    combine, and the store, image key (None: detected), iterations, memory budget (None:
    NormSim-D's default) and seed of a NormSim-D stage; DataComp's image-based rule's centroid
    file (None: k-means here, `image_clusters`, saved to `save_centroids` when given), targets
    and device, and the text-based rule's WordNet directory (None: NLTK's search path)."""

    keep: tuple[str, ...] = ()
    ties: str = EXACT
    union: tuple[str, ...] = ()
    intersect: tuple[str, ...] = ()
    store: str | None = None
    img_key: str | None = None
    normsim_d_iters: int = 500
    normsim_d_memory: str | None = None
    seed: int = 0
    centroids: str | None = None
    target: tuple[str, ...] = ()
    image_clusters: int = 100_000
    wordnet: str | None = None
    device: str = DEFAULT_DEVICE
    save_centroids: str | None = None


def select(
    scores_dir: str | os.PathLike | None, config: SelectConfig, progress: bool = True
) -> tuple[np.ndarray, dict]:
    """Run the --keep stages, then (result ∪ unions) ∩ intersects; returns (subset, report)."""
    rules, store, seed = config.keep, config.store, config.seed
    if scores_dir is None and rules:
        raise UsageError("--keep needs a SCORES directory")
    if scores_dir is None and not config.union:
        raise UsageError("give a SCORES directory or at least one --union subset file")
    if config.ties not in TIES:
        raise UsageError(f"--ties must be {' or '.join(TIES)}, got {config.ties!r}")
    parsed = [parse_rule(r) for r in (rules or (DEFAULT_RECIPE if scores_dir else ()))]
    if config.normsim_d_iters < 1:
        raise UsageError("--normsim-d-iters must be at least 1")
    memory = None if config.normsim_d_memory is None else parse_memory(config.normsim_d_memory)
    uses_d = any(r.metric == NORMSIM_D for r in parsed)
    if uses_d and store is None:
        raise UsageError("--keep normsim_d needs --store STORE (the embedding store)")
    if scores_dir is not None:
        paths = find_sidecars(scores_dir)
        source = Path(store) if store else (Path(scores_dir) if is_metadata(paths[0]) else None)
        image = ImageBasedConfig(
            config.centroids,
            tuple(config.target),
            config.image_clusters,
            seed,
            config.img_key,
            config.device,
            config.save_centroids,
        )
        plan = plan_columns(parsed, paths, source, config.wordnet, image)
        rows, wide = sidecar_rows(paths, plan.metrics)
        if plan.from_store:
            wide |= check_store(paths, source, sorted(plan.from_store))
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
        pool = open_pool(paths, rows, wide, progress, source, plan.from_store)
        n = pool.size
        alive = np.ones(n, dtype=bool)
        for rule in parsed:
            if rule.metric == NORMSIM_D:
                kept, record = normsim_d_stage(
                    rule,
                    pool,
                    np.flatnonzero(alive),
                    store,
                    img_key,
                    config.normsim_d_iters,
                    seed,
                    memory,
                )
                alive = np.zeros(n, dtype=bool)
                alive[kept] = True
            elif rule.op in (EQUALS, NAMED):
                alive, record = mask_stage(rule, pool, alive, plan)
            else:
                if rule.metric in DERIVED:
                    column = pool.per_file(
                        [plan.cols[need.names[0]] for need in DERIVED[rule.metric]],
                        lambda t, _, m=rule.metric: derived_values(m, t, plan.cols),
                        np.float64,
                        f"select: {rule.metric}",
                    )
                else:
                    column = pool.column(rule.metric)
                alive, record = apply_rule(rule, column, alive, n, pool.pairs_at, config.ties)
                del column
            report["stages"].append(record)
        survivors = np.flatnonzero(alive)
        del alive
        selected = sort_unique_pairs(pool.pairs_at(survivors))
        report.update(
            scores=str(scores_dir),
            source="metadata" if is_metadata(paths[0]) else "sidecars",
            sidecars=len(paths),
            pool=n,
            ties=config.ties,
            selected=int(len(selected)),
            duplicate_uids=int(len(survivors) - len(selected)),
        )
        if uses_d:
            report.update(store=str(store), img_key=img_key, normsim_d_iters=config.normsim_d_iters)

    result = union_pairs(selected, *(s for _, s in union_sets)) if union_sets else selected
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
