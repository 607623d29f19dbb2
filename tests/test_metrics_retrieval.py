"""Retrieval recall: a hand-computed multi-caption example and a slow reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmcurate.metrics import (
    RECALL_KEYS,
    mean_recall,
    ranks_of_best_positive,
    recall_at_k,
    retrieval_recall,
    summarize_runs,
)


def test_multi_caption_text_retrieval_by_hand():
    # Images at 0°, 90°, 180°. Captions: c0 at 120° and c1 at 10° belong to image 0, c2 at 80°
    # and c3 at 170° to image 1, c4 at 270° to image 2 (given exactly, so its ties are exact).
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    deg = torch.tensor([120.0, 10.0, 80.0, 170.0]) * torch.pi / 180
    texts = torch.cat([torch.stack([deg.cos(), deg.sin()], 1), torch.tensor([[0.0, -1.0]])])
    owner = [0, 0, 1, 1, 2]
    # TR (image -> captions), best rank over the image's captions:
    #   image 0: c1 (cos 0.98) is first -> 0 (its c0 alone, cos -0.5, would rank 2)
    #   image 1: c2 (0.98) first -> 0
    #   image 2: c4 (cos 0) is behind c3 (0.98) and c0 (0.5) -> 2
    # IR (caption -> images):
    #   c0: image 0 (-0.5) behind images 1 (0.87) and 2 (0.5) -> 2;  c1 -> 0;  c2 -> 0
    #   c3: image 1 (0.17) behind image 2 (0.98) -> 1
    #   c4: image 2 (0) ties with image 0 (0); a tie counts against -> 1
    r = retrieval_recall(images, texts, owner, ks=(1, 2, 3))
    assert r["TR@1"] == pytest.approx(200 / 3)
    assert r["TR@2"] == pytest.approx(200 / 3)
    assert r["TR@3"] == pytest.approx(100.0)
    assert r["IR@1"] == pytest.approx(40.0)
    assert r["IR@2"] == pytest.approx(80.0)
    assert r["IR@3"] == pytest.approx(100.0)


def test_ties_count_against_and_nan_ranks_last():
    scores = torch.tensor([[0.5, 0.5, 0.1], [float("nan"), 0.2, 0.3]])
    positive = torch.tensor([[True, False, False], [True, False, False]])
    assert ranks_of_best_positive(scores, positive).tolist() == [1, 2]
    constant = retrieval_recall(torch.ones(4, 3), torch.ones(4, 3), [0, 1, 2, 3], ks=(1,))
    assert constant == {"IR@1": 0.0, "TR@1": 0.0}


def _slow(images, texts, owner, ks):
    sim = images @ texts.T
    n_img, n_txt = sim.shape
    tr, ir = [], []
    for i in range(n_img):
        best = max(sim[i, j] for j in range(n_txt) if owner[j] == i)
        tr.append(sum(1 for j in range(n_txt) if owner[j] != i and sim[i, j] >= best))
    for j in range(n_txt):
        mine = sim[owner[j], j]
        ir.append(sum(1 for i in range(n_img) if i != owner[j] and sim[i, j] >= mine))
    out = {f"IR@{k}": 100 * np.mean([r < k for r in ir]) for k in ks}
    out.update({f"TR@{k}": 100 * np.mean([r < k for r in tr]) for k in ks})
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_slow_loop_with_chunking(seed):
    gen = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(30, 8, generator=gen), dim=1)
    owner = np.repeat(np.arange(30), 3)[torch.randperm(90, generator=gen).numpy()]
    texts = torch.nn.functional.normalize(
        images[owner] + 0.8 * torch.randn(90, 8, generator=gen), dim=1
    )
    fast = retrieval_recall(images, texts, owner, chunk=7)
    slow = _slow(images.double(), texts.double(), owner, (1, 5, 10))
    assert fast.keys() == slow.keys()
    for k in fast:
        assert fast[k] == pytest.approx(slow[k], abs=1e-9), k


def test_recall_at_k_mean_recall_and_summary():
    assert recall_at_k(torch.tensor([0, 3, 7, 12]), (1, 5, 10)) == {1: 25.0, 5: 50.0, 10: 75.0}
    run = dict.fromkeys(RECALL_KEYS, 10.0) | {"TR@10": 40.0}
    assert mean_recall(run) == pytest.approx(15.0)
    summary = summarize_runs([run, dict.fromkeys(RECALL_KEYS, 20.0)])
    assert summary["IR@1"] == {"mean": 15.0, "std": 5.0}
    assert summary["TR@10"] == {"mean": 30.0, "std": 10.0}
