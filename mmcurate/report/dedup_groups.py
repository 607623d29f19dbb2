"""SemDeDup's largest duplicate groups, from the `semdedup` column, the score run's own
`.semdedup/assign` files (each row's cluster) and, when its store is still there, the image
embeddings of the few clusters shown (to pair each removed row with its nearest kept one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmcurate.curate.pool import Pool
from mmcurate.report.samples import store_of

DEDUP_COLUMN = "semdedup"
DEFAULT_THRESHOLD = 0.95  # `--keep 'semdedup<=0.95'`, SemDeDup at ε = 0.05


@dataclass
class DedupGroup:
    """A kept row and the removed rows nearest to it (cosine to it), within one cluster."""

    cluster: int
    kept: int | None
    removed: list[tuple[int, float]] = field(default_factory=list)


def _assign(scores_dir: Path, stem: str, rows: int) -> dict | None:
    path = scores_dir / ".semdedup" / "assign" / f"{stem}.npz"
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as npz:
        if len(npz["cluster"]) != rows:
            return None
        return {"cluster": np.asarray(npz["cluster"]), "rows": np.asarray(npz["rows"])}


def _embeddings(scores_dir: Path, pool: Pool, i: int, store_rows: np.ndarray) -> np.ndarray | None:
    """Unit image embeddings of some store rows of the i-th stem; None without the store."""
    from mmcurate.data.atomic import read_json_dict
    from mmcurate.data.store import read_arrays

    stem = pool.stems[i]
    store = store_of(scores_dir, stem)
    marker = read_json_dict(scores_dir / f"{stem}.done.json") or {}
    key = (marker.get("config") or {}).get("img_key")
    if store is None or not isinstance(key, str):
        return None
    try:
        x = np.asarray(read_arrays(store, stem, [key])[key][np.sort(store_rows)], dtype=np.float32)
    except Exception:
        return None
    x = x[np.argsort(np.argsort(store_rows))]
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def dedup_groups(
    scores_dir: str | Path, pool: Pool, threshold: float, shown: int
) -> tuple[list[DedupGroup], str]:
    """The `shown` largest groups of rows scoring above `threshold`, and a note on how they
    were found (empty list and the reason when the cluster files are gone)."""
    root = Path(scores_dir)
    values = pool.column(DEDUP_COLUMN)
    removed = values > threshold
    counts = np.zeros(0, dtype=np.int64)
    for i in range(len(pool.paths)):
        lo, hi = int(pool.offsets[i]), int(pool.offsets[i + 1])
        assign = _assign(root, pool.stems[i], hi - lo)
        if assign is None:
            return [], f"no SemDeDup cluster files for {pool.stems[i]} in {root / '.semdedup'}"
        ids = assign["cluster"][removed[lo:hi]]
        if len(ids):
            grown = np.bincount(ids, minlength=len(counts))
            grown[: len(counts)] += counts
            counts = grown
    if not counts.any():
        return [], f"no row scores above {threshold:g}"
    top = np.lexsort((np.arange(len(counts)), -counts))[: 2 * shown]
    top = top[counts[top] > 0]
    members: dict[int, list] = {int(c): [] for c in top}
    paired = True
    for i in range(len(pool.paths)):
        lo, hi = int(pool.offsets[i]), int(pool.offsets[i + 1])
        assign = _assign(root, pool.stems[i], hi - lo)
        local = np.flatnonzero(np.isin(assign["cluster"], top))
        if not len(local):
            continue
        x = _embeddings(root, pool, i, assign["rows"][local])
        paired &= x is not None
        for j, r in enumerate(local):
            emb = x[j] if x is not None else None
            members[int(assign["cluster"][r])].append((lo + int(r), emb))
    groups = []
    for cluster, rows in members.items():
        groups += _pair(cluster, rows, removed, paired)
    groups.sort(key=lambda g: (-len(g.removed), g.cluster, g.kept if g.kept is not None else -1))
    how = (
        "each removed row is paired with the kept row of its cluster nearest to it (cosine of "
        "the image embeddings in the scored store)"
        if paired
        else "the scored store is not readable, so groups are whole clusters (removed rows only)"
    )
    return groups[:shown], how


def _pair(cluster: int, rows: list, removed: np.ndarray, paired: bool) -> list[DedupGroup]:
    """A cluster's removed rows grouped under their nearest kept row (or the whole cluster)."""
    gone = [(r, e) for r, e in rows if removed[r]]
    kept = [(r, e) for r, e in rows if not removed[r]]
    if not paired or not kept:
        return [DedupGroup(cluster, None, [(r, float("nan")) for r, _ in gone])]
    anchor = np.stack([e for _, e in kept])
    groups: dict[int, DedupGroup] = {}
    for r, e in gone:
        cos = anchor @ e
        best = int(np.argmax(cos))
        group = groups.setdefault(best, DedupGroup(cluster, kept[best][0]))
        group.removed.append((r, float(cos[best])))
    for g in groups.values():
        g.removed.sort(key=lambda item: (-item[1], item[0]))
    return list(groups.values())
