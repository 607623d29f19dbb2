"""Build the report: read the pool column by column, replay the selection, pick the example
rows (seeded), fetch their details and thumbnails, and write one self-contained HTML file."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmcurate.curate.pool import find_sidecars, is_metadata, open_pool, sidecar_rows
from mmcurate.data.atomic import read_json_dict, write_bytes_atomic
from mmcurate.data.subset import load_subset, record_path
from mmcurate.errors import UsageError
from mmcurate.report.dedup_groups import DEDUP_COLUMN, DEFAULT_THRESHOLD, dedup_groups
from mmcurate.report.html import Markup, heading, page, para
from mmcurate.report.page import column_block, dedup_section, funnel_section, pool_section
from mmcurate.report.pool_view import (
    column_stats,
    replay,
    sample_rows,
    score_columns,
    subset_rows,
)
from mmcurate.report.samples import fetch_from_shards, row_details, store_captions

NORMSIM_PREFIX = "normsim"


@dataclass(frozen=True)
class ReportConfig:
    """Options of `mmcurate report`: the subset and shards shown, examples per band (drawn
    with `seed` from the `band`·examples rows nearest each end or cut-off), histogram bins,
    SemDeDup groups shown, thumbnail size in pixels, and the page title."""

    subset: str | None = None
    shards: tuple[str, ...] = ()
    examples: int = 8
    band: int = 4
    seed: int = 0
    bins: int = 50
    groups: int = 6
    thumb: int = 96
    title: str = "mmcurate report"


def check_out(out: str | os.PathLike) -> Path:
    """The output path, refused before any work when it cannot be written."""
    path = Path(out)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"--out {path} is a directory; give a file such as report.html")
    if not parent.is_dir():
        raise UsageError(f"--out {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"--out {path}: not writable")
    return path


def _subset(pool, config: ReportConfig, scores_dir) -> tuple[dict, np.ndarray | None, dict]:
    """The subset's record, its row mask over the pool and what the Pool table says of it."""
    if config.subset is None:
        return {}, None, {}
    subset = load_subset(config.subset)
    mask = subset_rows(pool, subset)
    rows = int(np.count_nonzero(mask))
    if len(subset) and rows == 0:
        raise UsageError(
            f"none of the {len(subset)} uids of {config.subset} is in {scores_dir}"
            " (was the subset selected from these scores?)"
        )
    record = read_json_dict(record_path(config.subset)) or {}
    return record, mask, {"path": str(config.subset), "uids": int(len(subset)), "rows": rows}


def _replay_notes(stages) -> list[str]:
    notes = []
    for s in stages:
        if s.replayed is None:
            notes.append(f"{s.rule} is not replayed (it needs the embedding store).")
        elif s.recorded is not None and s.replayed != s.recorded:
            notes.append(
                f"{s.rule} keeps {s.replayed:,} rows on these scores, {s.recorded:,} when the "
                "subset was made: the scores changed since."
            )
    return notes


def _images(view: dict, pool, details: dict, config: ReportConfig, scores_dir) -> None:
    """Captions from the store, thumbnails (and captions, keys, URLs) from the shards, with
    notes on what was found."""
    from_store = store_captions(scores_dir, pool, details)
    view["captions_note"] = (
        "from the DataComp metadata"
        if view["source"] == "metadata"
        else f"{from_store} of {len(details)} from the scored store"
    )
    view["thumbs"], view["no_image"] = {}, "no image: run with --shards"
    if not config.shards:
        view["images_note"] = "none (give --shards SRC… to see the images)"
        return
    wanted: dict[str, set[str]] = {}
    for d in details.values():
        wanted.setdefault(d["stem"], set()).add(d["uid"])
    found, problems = fetch_from_shards(config.shards, wanted, config.thumb)
    for d in details.values():
        hit = found.get(d["uid"]) or {}
        for field in ("caption", "url"):
            if hit.get(field) is not None:
                d[field] = hit[field]
        d["key"] = hit.get("key")
    view["thumbs"] = found
    images = sum(1 for f in found.values() if f["thumb"])
    view["no_image"] = "not in the given shards"
    view["images_note"] = f"{images} of {len(details)} shown rows found in the shards"
    if not found:
        view["images_note"] = "none of the shown rows is in the given shards: no thumbnails"
    if problems:
        view["images_note"] += "; unreadable: " + "; ".join(problems[:3])


def build_sections(
    scores_dir: str | os.PathLike,
    config: ReportConfig = ReportConfig(),
    tags: Mapping[str, str] | None = None,
) -> tuple[list[Markup], dict]:
    """The report's sections for a SCORES directory, and a summary of what was read; `tags`
    adds a line to the card of each uid it names (the demo's ground truth)."""
    paths = find_sidecars(scores_dir)
    columns = score_columns(paths[0])
    if not columns:
        raise UsageError(f"{paths[0]} holds no score column (only uid and non-float columns)")
    rows, wide = sidecar_rows(paths, columns)
    pool = open_pool(paths, rows, wide, progress=False)
    record, in_subset, subset_info = _subset(pool, config, scores_dir)
    stages = replay(pool, record, config.examples, config.band, config.seed) if record else []
    stats, top, bottom = {}, {}, {}
    for i, name in enumerate(columns):
        values = pool.column(name)
        stats[name] = column_stats(name, values, in_subset, config.bins)
        rng = np.random.default_rng([config.seed, 3, i])
        top[name] = sample_rows(values, None, True, config.examples, config.band, rng)
        bottom[name] = sample_rows(values, None, False, config.examples, config.band, rng)
        del values
    dedup = None
    if DEDUP_COLUMN in columns:
        rule = [s for s in stages if s.metric == DEDUP_COLUMN and s.low_kept and s.threshold]
        threshold = float(rule[0].threshold) if rule else DEFAULT_THRESHOLD
        groups, how = dedup_groups(scores_dir, pool, threshold, config.groups)
        dedup = {"threshold": threshold, "groups": groups, "how": how}
    every = _shown_rows([*top.values(), *bottom.values()], stages, dedup, config.examples)
    details = row_details(pool, every, columns)
    view = {
        "scores": str(scores_dir),
        "files": len(paths),
        "source": "metadata" if is_metadata(paths[0]) else "sidecars",
        "pool": pool.size,
        "columns": columns,
        "subset": subset_info,
        "record": record,
        "stages": stages,
        "replay_notes": _replay_notes(stages),
        "in_subset": in_subset,
        "details": details,
        "top": top,
        "bottom": bottom,
        "dedup": dedup,
        "examples": config.examples,
        "tags": tags or {},
    }
    _images(view, pool, details, config, scores_dir)
    parts = [*pool_section(view), *funnel_section(view)]
    plain = [c for c in columns if not c.startswith(NORMSIM_PREFIX)]
    normsim = [c for c in columns if c.startswith(NORMSIM_PREFIX)]
    parts.append(heading(2, "Score columns", "columns"))
    parts.append(
        para(
            f"Examples: {config.examples} rows drawn with seed {config.seed} from the "
            f"{config.band * config.examples} nearest each end and each cut-off.",
            note=True,
        )
    )
    for name in plain:
        parts += column_block(stats[name], view, ("top", "bottom"))
    if normsim:
        parts.append(heading(2, "NormSim: similarity to the target", "normsim"))
        parts.append(para(_target_note(scores_dir, pool.stems[0])))
        for name in normsim:
            parts += column_block(
                stats[name], view, ("most like the target", "least like the target")
            )
    parts += dedup_section(view)
    summary = {
        "pool": pool.size,
        "columns": columns,
        "shown_rows": len(details),
        "thumbnails": sum(1 for f in view["thumbs"].values() if f["thumb"]),
        "subset": subset_info,
    }
    return parts, summary


def _shown_rows(bands: list, stages, dedup: dict | None, per: int) -> np.ndarray:
    """Every row a card shows: the column bands, the cut-off bands and the SemDeDup groups."""
    shown = [*bands, *[r for s in stages for r in (s.kept, s.dropped) if r is not None]]
    for g in (dedup or {}).get("groups", []):
        shown.append(np.array([g.kept] if g.kept is not None else [], dtype=np.int64))
        shown.append(np.array([r for r, _ in g.removed[:per]], dtype=np.int64))
    return np.unique(np.concatenate([np.asarray(r, dtype=np.int64) for r in shown]))


def _target_note(scores_dir, stem: str) -> str:
    """Which target set the NormSim columns were scored against, as the done marker says."""
    marker = read_json_dict(Path(scores_dir) / f"{stem}.done.json") or {}
    targets = (marker.get("config") or {}).get("targets")
    where = f" ({', '.join(map(str, targets))})" if targets else ""
    return (
        f"Each row's NormSim score against the target set{where}: high is like the target. "
        "The most and least target-like rows are shown."
    )


def write_report(
    scores_dir: str | os.PathLike, out: str | os.PathLike, config: ReportConfig = ReportConfig()
) -> dict:
    """Write the report for SCORES to OUT (atomically, nothing written on bad input)."""
    began = time.perf_counter()
    path = check_out(out)
    parts, summary = build_sections(scores_dir, config)
    data = page(config.title, parts).encode()
    try:
        write_bytes_atomic(path, data)
    except OSError as exc:
        raise UsageError(f"--out {path}: {exc.strerror or exc}") from None
    return {**summary, "out": str(path), "bytes": len(data), "seconds": time.perf_counter() - began}
