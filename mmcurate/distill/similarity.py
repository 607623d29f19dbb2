"""The learned similarity matrix S of LoRS: low-rank S = diag(a) + (α/r)·L Rᵀ, or a full matrix."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmcurate.errors import UsageError


class LowRankSimilarity(nn.Module):
    """S = diag(a) + (α/r)·L Rᵀ, starting at a = 1, L ~ N(0, 1), R = 0, so S = I."""

    def __init__(
        self, n: int, rank: int, alpha: float, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if rank < 1:
            raise UsageError(f"similarity rank must be >= 1 (or 'full'), got {rank}")
        self.n, self.rank, self.alpha = int(n), int(rank), float(alpha)
        self.a = nn.Parameter(torch.ones(n))
        self.L = nn.Parameter(torch.randn(n, rank, generator=generator))
        self.R = nn.Parameter(torch.zeros(n, rank))

    def block(self, idx: Tensor) -> Tensor:
        """The sub-matrix S[idx][:, idx] of a mini-batch, without forming the N×N matrix."""
        scale = self.alpha / self.rank
        return torch.diag(self.a[idx]) + scale * self.L[idx] @ self.R[idx].T

    def matrix(self) -> Tensor:
        """The whole N×N matrix."""
        return self.block(torch.arange(self.n, device=self.a.device))

    def export(self) -> dict:
        """The artifact form of SPEC §8: a, L, R, alpha, rank."""
        return {
            "a": self.a.detach().cpu().float().clone(),
            "L": self.L.detach().cpu().float().clone(),
            "R": self.R.detach().cpu().float().clone(),
            "alpha": self.alpha,
            "rank": self.rank,
        }


class FullSimilarity(nn.Module):
    """A full learned N×N matrix S, starting at I."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = int(n)
        self.S = nn.Parameter(torch.eye(n))

    def block(self, idx: Tensor) -> Tensor:
        """The sub-matrix S[idx][:, idx] of a mini-batch."""
        return self.S[idx][:, idx]

    def matrix(self) -> Tensor:
        """The whole N×N matrix."""
        return self.S

    def export(self) -> dict:
        """SPEC §8 form, exact: a = 0, L = S, R = I, α = r = N give diag(a) + (α/r)·L Rᵀ = S."""
        n = self.n
        return {
            "a": torch.zeros(n),
            "L": self.S.detach().cpu().float().clone(),
            "R": torch.eye(n),
            "alpha": float(n),
            "rank": n,
        }


def make_similarity(
    n: int, rank: int | str, alpha: float, generator: torch.Generator | None = None
) -> LowRankSimilarity | FullSimilarity:
    """A fresh similarity at S = I: rank r (low-rank) or rank 'full'."""
    if rank == "full":
        return FullSimilarity(n)
    return LowRankSimilarity(n, int(rank), alpha, generator)


def similarity_from_export(sim: dict) -> LowRankSimilarity:
    """Rebuild S from an artifact's similarity dict (either variant; both share the form)."""
    a, L, R = sim["a"], sim["L"], sim["R"]
    module = LowRankSimilarity(a.shape[0], int(sim["rank"]), float(sim["alpha"]))
    with torch.no_grad():
        module.a.copy_(a)
        module.L.copy_(L)
        module.R.copy_(R)
    return module.requires_grad_(False)
