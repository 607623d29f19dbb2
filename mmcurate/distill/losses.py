"""Student losses on a logits matrix (images × texts) against a soft target matrix S."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mmcurate.errors import UsageError

EPS = 1e-6
LossFn = Callable[[Tensor, Tensor], Tensor]


def _bce_matrix(logits: Tensor, target: Tensor) -> Tensor:
    """M = −S·log(P+1e−6) − (1−S)·log(1−P+1e−6) with P = σ(logits)."""
    p = torch.sigmoid(logits)
    return -target * torch.log(p + EPS) - (1 - target) * torch.log(1 - p + EPS)


def wbce(logits: Tensor, target: Tensor) -> Tensor:
    """Weighted BCE: ½·[mean M over {S > 0.5} + mean M over {S ≤ 0.5}]; an empty group adds 0."""
    m = _bce_matrix(logits, target)
    pos = (target > 0.5).to(m.dtype)
    neg = 1 - pos
    pos_mean = (m * pos).sum() / pos.sum().clamp(min=1)
    neg_mean = (m * neg).sum() / neg.sum().clamp(min=1)
    return 0.5 * (pos_mean + neg_mean)


def bce(logits: Tensor, target: Tensor) -> Tensor:
    """Plain BCE against S: the mean of M over all entries."""
    return _bce_matrix(logits, target).mean()


def mse(logits: Tensor, target: Tensor) -> Tensor:
    """Mean squared error between σ(logits) and S."""
    return (torch.sigmoid(logits) - target).pow(2).mean()


def soft_infonce(logits: Tensor, target: Tensor) -> Tensor:
    """Soft-target InfoNCE, rows and columns: ½·[−Σ S∘log softmax_r − Σ S∘log softmax_c]/n."""
    row = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    col = -(target * F.log_softmax(logits, dim=0)).sum(dim=0).mean()
    return 0.5 * (row + col)


def symmetric_ce(logits: Tensor, target: Tensor | None = None) -> Tensor:
    """The standard CLIP loss: ½·[CE(rows, diagonal) + CE(columns, diagonal)]; S is ignored."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


LOSSES: dict[str, LossFn] = {
    "wbce": wbce,
    "infonce": soft_infonce,
    "bce": bce,
    "mse": mse,
    "ce": symmetric_ce,
}


def get_loss(name: str) -> LossFn:
    """The loss called NAME (wbce, infonce, bce, mse, ce)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise UsageError(f"unknown loss {name!r}: choose from {', '.join(LOSSES)}") from None
