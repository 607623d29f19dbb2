"""Noise-detection AUROC and ROC curves, with ties counted as half (the Mann-Whitney form).

Convention: `labels` are 1 for positives (for noise detection: the injected faults) and a
higher `score` means "more likely positive". Quality scores rank noise low, so callers pass
`-quality` (or use `detection_auroc`).
"""

from __future__ import annotations

import numpy as np


def _validated(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if np.isnan(s).any():
        raise ValueError("scores hold NaN")
    return s, y


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks where tied values share the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auroc(scores, labels) -> float:
    """P(score of a random positive > score of a random negative) + ½·P(tie); NaN if one class."""
    s, y = _validated(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = _midranks(s)[y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def detection_auroc(quality, is_fault) -> float:
    """AUROC of flagging faults by low quality (a metric that keeps good pairs high)."""
    return auroc(-np.asarray(quality, dtype=np.float64), is_fault)


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, from (0, 0) to (1, 1).

    Tied scores move the curve diagonally in one step, so the trapezoid area under it equals
    `auroc` exactly; a binary score (kept / dropped) gives one interior point.
    """
    s, y = _validated(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_curve needs both positives and negatives")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_run = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tp = np.cumsum(y_sorted)[last_of_run]
    fp = np.cumsum(~y_sorted)[last_of_run]
    fpr = np.r_[0.0, fp / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    thresholds = np.r_[np.inf, s_sorted[last_of_run]]
    return fpr, tpr, thresholds


def curve_area(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Trapezoid area under a ROC curve."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
