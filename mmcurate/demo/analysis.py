"""The demo's measurements against its ground truth: noise-detection AUROC per metric and per
fault, what the selection kept, and how well NormSim finds target-relevant pairs. Pure: arrays
in, numbers out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mmcurate.metrics.auroc import detection_auroc, roc_curve
from mmcurate.metrics.retrieval import RECALL_KEYS

FAULT_ORDER = ("clean", "misaligned", "generic", "duplicate", "rare")
NOISE = ("misaligned", "generic")
GOOD = ("clean", "rare")
FAULT_COLOURS = {
    "clean": "#4c72b0",
    "misaligned": "#c44e52",
    "generic": "#dd8452",
    "duplicate": "#8172b3",
    "rare": "#55a868",
}
SET_LABELS = {
    "distilled": "LoRS distilled",
    "mtt": "MTT (S = I, CE)",
    "random": "random real",
    "full": "full subset",
}


def noise_mask(faults: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows in the noise-detection task, is-noise): misaligned+generic against clean+rare."""
    faults = np.asarray(faults)
    rows = np.isin(faults, NOISE + GOOD)
    return rows, np.isin(faults, NOISE)


def fault_aurocs(quality: np.ndarray, faults: np.ndarray) -> dict[str, float]:
    """Per fault: AUROC of telling it from clean pairs by low quality (0.5 = blind to it).

    For `rare` (good data) a value above 0.5 means the metric under-rates rare concepts.
    """
    quality, faults = np.asarray(quality, dtype=np.float64), np.asarray(faults)
    out = {}
    for fault in FAULT_ORDER[1:]:
        rows = (faults == fault) | (faults == "clean")
        if (faults == fault).any() and (faults == "clean").any():
            out[fault] = detection_auroc(quality[rows], faults[rows] == fault)
    return out


def analyse(
    scores: Mapping[str, np.ndarray],
    faults: np.ndarray,
    selected: np.ndarray,
    *,
    relevant: np.ndarray | None = None,
    normsim: np.ndarray | None = None,
    stage_masks: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """AUROCs of every metric and of the final selection, ROC points, target relevance."""
    faults = np.asarray(faults)
    rows, is_noise = noise_mask(faults)
    curves = {name: np.asarray(v, dtype=np.float64) for name, v in scores.items()}
    curves["selection"] = np.asarray(selected, dtype=np.float64)
    result: dict[str, Any] = {
        "auroc": {},
        "auroc_by_fault": {},
        "roc": {},
        "counts": {f: int((faults == f).sum()) for f in FAULT_ORDER},
    }
    for name, quality in curves.items():
        result["auroc"][name] = detection_auroc(quality[rows], is_noise[rows])
        result["auroc_by_fault"][name] = fault_aurocs(quality, faults)
        fpr, tpr, _ = roc_curve(-quality[rows], is_noise[rows])
        result["roc"][name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    sel = np.asarray(selected, dtype=bool)
    result["selection"] = {
        "kept": int(sel.sum()),
        "pool": int(len(sel)),
        "kept_by_fault": {f: int((sel & (faults == f)).sum()) for f in FAULT_ORDER},
    }
    if relevant is not None and normsim is not None:
        result["target"] = target_relevance(normsim, relevant, stage_masks or {"final": sel})
    return result


def target_relevance(
    normsim: np.ndarray, relevant: np.ndarray, stage_masks: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """How well NormSim finds target-relevant pool pairs, and their share after each stage."""
    normsim = np.asarray(normsim, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    shares = {"pool": float(relevant.mean())}
    means = {"pool": float(normsim.mean())}
    for name, mask in stage_masks.items():
        mask = np.asarray(mask, dtype=bool)
        shares[name] = float(relevant[mask].mean()) if mask.any() else float("nan")
        means[name] = float(normsim[mask].mean()) if mask.any() else float("nan")
    return {
        "auroc": detection_auroc(-normsim, relevant),
        "relevant_share": shares,
        "mean_normsim": means,
    }


def recall_mean(entry: Mapping[str, Any]) -> float:
    """Mean of the six R@K of one retrieval entry ({"IR@1": {"mean": ..}, ...})."""
    return float(np.mean([entry[k]["mean"] for k in RECALL_KEYS]))


def redundant_copies(quality: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each duplicate group's copies but the one `quality` ranks best: what a deduplication
    should drop. Which copy stays is arbitrary, so each metric keeps its own best."""
    quality, groups = np.asarray(quality, dtype=np.float64), np.asarray(groups)
    extra = groups >= 0
    for group in np.unique(groups[extra]):
        members = np.flatnonzero(groups == group)
        extra[members[np.argmax(quality[members])]] = False
    return extra


def duplicates_kept(kept: np.ndarray, groups: np.ndarray) -> int:
    """Duplicates a subset keeps: each group's kept copies beyond one (D = N - |C|)."""
    kept, groups = np.asarray(kept, dtype=bool), np.asarray(groups)
    _, per_group = np.unique(groups[kept & (groups >= 0)], return_counts=True)
    return int((per_group - 1).sum())


def duplicate_aurocs(quality: np.ndarray, faults: np.ndarray, groups: np.ndarray) -> dict:
    """AUROC of telling duplicates from clean pairs by low quality: the duplicates are each
    group's copies but one (a perfect deduplication scores 1.0); and over every copy, which
    counts the copy any deduplication keeps as a miss."""
    quality, faults = np.asarray(quality, dtype=np.float64), np.asarray(faults)
    clean, copies = faults == "clean", faults == "duplicate"
    extra = redundant_copies(quality, groups)
    return {
        "duplicates": detection_auroc(quality[extra | clean], extra[extra | clean]),
        "every_copy": detection_auroc(quality[copies | clean], copies[copies | clean]),
    }
