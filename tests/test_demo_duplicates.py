"""The demo's duplicate figures: redundant copies per group, their AUROCs and the duplicates a
subset keeps, against counting every pair and every group by hand."""

from __future__ import annotations

import itertools

import numpy as np

from mmcurate.demo.analysis import duplicate_aurocs, duplicates_kept, redundant_copies


def pair_count_auroc(quality: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores lower than a negative), ties counting one half."""
    wins = [
        1.0 if quality[p] < quality[n] else 0.5 if quality[p] == quality[n] else 0.0
        for p, n in itertools.product(np.flatnonzero(positive), np.flatnonzero(negative))
    ]
    return float(np.mean(wins))


def test_each_group_keeps_its_best_copy_and_the_aurocs_count_pairs():
    rng = np.random.default_rng(3)
    faults = np.array(["clean"] * 30 + ["duplicate"] * 12 + ["misaligned"] * 5)
    groups = np.array([-1] * 30 + [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2] + [-1] * 5)
    quality = rng.normal(size=len(faults)).round(1)  # rounding makes ties
    extra = redundant_copies(quality, groups)
    for g in range(3):
        members = np.flatnonzero(groups == g)
        kept = members[~extra[members]]
        assert len(kept) == 1 and quality[kept[0]] == quality[members].max()
    assert not extra[groups < 0].any()

    got = duplicate_aurocs(quality, faults, groups)
    clean = faults == "clean"
    expect_all = pair_count_auroc(quality, faults == "duplicate", clean)
    assert abs(got["every_copy"] - expect_all) < 1e-12
    assert abs(got["duplicates"] - pair_count_auroc(quality, extra, clean)) < 1e-12


def test_a_perfect_dedup_scores_one_on_redundant_copies_only():
    faults = np.array(["clean"] * 6 + ["duplicate"] * 4)
    groups = np.array([-1] * 6 + [0] * 4)
    semdedup = np.array([0.1, 0.3, 0.2, 0.5, 0.4, 0.6, 0.35, 1.0, 1.0, 1.0])
    got = duplicate_aurocs(-semdedup, faults, groups)
    assert got["duplicates"] == 1.0
    assert got["every_copy"] < 1.0


def test_duplicates_kept_counts_each_groups_copies_beyond_one():
    rng = np.random.default_rng(5)
    groups = np.array([-1] * 20 + [0] * 5 + [1] * 5 + [2] * 3 + [3] * 2)
    for _ in range(50):
        kept = rng.random(len(groups)) < 0.5
        by_hand = 0
        for g in range(4):
            in_group = int(kept[groups == g].sum())
            by_hand += in_group - 1 if in_group else 0
        assert duplicates_kept(kept, groups) == by_hand
    assert duplicates_kept(groups >= -1, groups) == 15 - 4
    assert duplicates_kept(groups < 0, groups) == 0
