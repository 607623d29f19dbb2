"""Retrieval recall: IR@K (text → image) and TR@K (image → text, best rank over captions)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

KS = (1, 5, 10)
RECALL_KEYS = tuple(f"{d}@{k}" for d in ("IR", "TR") for k in KS)


def ranks_of_best_positive(scores: Tensor, positive: Tensor) -> Tensor:
    """Per query, how many negatives score at least as high as its best positive (0 = top).

    Ties count against the query, and NaN scores rank last, so a degenerate model cannot
    look good.
    """
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"))
    best = scores.masked_fill(~positive, float("-inf")).max(dim=1).values
    return ((scores >= best[:, None]) & ~positive).sum(dim=1)


def recall_at_k(ranks: Tensor, ks: Sequence[int] = KS) -> dict[int, float]:
    """Percentage of queries whose rank is below k, for each k."""
    return {k: float((ranks < k).double().mean() * 100) for k in ks}


def retrieval_recall(
    image_emb: Tensor,
    text_emb: Tensor,
    text_image: Sequence[int] | np.ndarray | Tensor,
    ks: Sequence[int] = KS,
    chunk: int = 1024,
) -> dict[str, float]:
    """IR@K and TR@K in percent; `text_image[j]` is the image row of caption j.

    IR: each caption retrieves among all images. TR: each image retrieves among all captions,
    and a hit counts the best rank over that image's captions (Flickr30k/COCO have five).
    """
    img = F.normalize(image_emb.float(), dim=1)
    txt = F.normalize(text_emb.float(), dim=1)
    owner = torch.as_tensor(np.asarray(text_image), dtype=torch.long)
    n_img = img.shape[0]
    image_ids = torch.arange(n_img)
    tr_ranks, ir_ranks = [], []
    for s in range(0, n_img, chunk):
        rows = image_ids[s : s + chunk]
        tr_ranks.append(ranks_of_best_positive(img[rows] @ txt.T, owner[None, :] == rows[:, None]))
    for s in range(0, txt.shape[0], chunk):
        cap = owner[s : s + chunk]
        ir_ranks.append(
            ranks_of_best_positive(txt[s : s + chunk] @ img.T, image_ids[None, :] == cap[:, None])
        )
    ir = recall_at_k(torch.cat(ir_ranks), ks)
    tr = recall_at_k(torch.cat(tr_ranks), ks)
    return {**{f"IR@{k}": v for k, v in ir.items()}, **{f"TR@{k}": v for k, v in tr.items()}}


def mean_recall(recalls: dict[str, float]) -> float:
    """The mean of the six R@K figures (IR and TR at 1, 5, 10)."""
    return float(np.mean([recalls[k] for k in RECALL_KEYS]))


def summarize_runs(runs: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean ± (population) std of each R@K over several runs."""
    return {
        k: {
            "mean": float(np.mean([r[k] for r in runs])),
            "std": float(np.std([r[k] for r in runs])),
        }
        for k in runs[0]
    }
