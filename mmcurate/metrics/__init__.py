"""Metrics shared by commands and reports."""

from mmcurate.metrics.retrieval import (
    RECALL_KEYS,
    mean_recall,
    ranks_of_best_positive,
    recall_at_k,
    retrieval_recall,
    summarize_runs,
)

__all__ = [
    "RECALL_KEYS",
    "mean_recall",
    "ranks_of_best_positive",
    "recall_at_k",
    "retrieval_recall",
    "summarize_runs",
]
