"""Score math of SPEC §4, part one: CLIPScore and negCLIPLoss. Pure functions, no I/O.

Embedding arguments are row sources (`curate.rows`), read block by block as float32.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mmcurate.curate.rows import DEFAULT_BLOCK, Rows, as_f32, blocks, torch_device

Seed = int | Sequence[int]
NEGCLIP_BLOCK = 256


def clipscore(img: Rows, txt: Rows, block: int = DEFAULT_BLOCK) -> np.ndarray:
    """CLIPScore s_ii = f_iᵀ g_i per pair, float32."""
    n = len(img)
    if len(txt) != n:
        raise ValueError(f"img has {n} rows but txt has {len(txt)}")
    out = np.empty(n, dtype=np.float32)
    for r0, r1 in blocks(n, block):
        out[r0:r1] = np.einsum("ij,ij->i", as_f32(img, slice(r0, r1)), as_f32(txt, slice(r0, r1)))
    return out


# --------------------------------------------------------------------------- negCLIPLoss


@dataclass(frozen=True)
class Batching:
    """One random batching of a window: `index[b]` are the window rows of batch b.

    `scored[b, j]` is False for tail fillers, which only act as contrast in that batch.
    Every window row is scored exactly once per batching.
    """

    index: np.ndarray
    scored: np.ndarray


def negclip_batching(n: int, batch_size: int, seed: Seed, k: int) -> Batching:
    """The k-th seeded batching of a window of n rows (SPEC §4): exactly B pairs per batch."""
    if n <= 0:
        return Batching(np.zeros((0, 0), np.int64), np.zeros((0, 0), bool))
    seed_list = [int(s) for s in ([seed] if isinstance(seed, int | np.integer) else seed)]
    rng = np.random.default_rng([*seed_list, int(k)])
    b = min(int(batch_size), n)
    perm = rng.permutation(n)
    n_batches = -(-n // b)
    index = np.empty((n_batches, b), dtype=np.int64)
    scored = np.ones((n_batches, b), dtype=bool)
    index.reshape(-1)[:n] = perm
    tail = n - (n_batches - 1) * b
    if tail < b:
        rest = perm[: n - tail]
        index[-1, tail:] = rng.choice(rest, size=b - tail, replace=False)
        scored[-1, tail:] = False
    return Batching(index, scored)


def negclip_batchings(n: int, batch_size: int, k: int, seed: Seed) -> list[Batching]:
    """All K batchings of a window (what `negclip_scores` uses for the same arguments)."""
    return [negclip_batching(n, batch_size, seed, kk) for kk in range(k)]


def batch_logsumexp(
    img: torch.Tensor, txt: torch.Tensor, tau: float, block: int = NEGCLIP_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column logsumexp of S/τ (S = img txtᵀ, B×B) in row blocks, memory O(B·block).

    Returns (lse_j s_ij/τ, lse_j s_ji/τ) for every i of the batch. One matmul per block feeds
    both: rows reduce within the block, columns accumulate an online (max, sum) across blocks.
    """
    b = img.shape[0]
    scaled = img * (1.0 / tau)
    txt_t = txt.t()
    block = max(1, min(int(block), b))
    buf = torch.empty((block, b), dtype=img.dtype, device=img.device)
    tmp = torch.empty_like(buf)
    row_lse = torch.empty(b, dtype=img.dtype, device=img.device)
    col_max = torch.full((b,), -math.inf, dtype=img.dtype, device=img.device)
    col_sum = torch.zeros(b, dtype=img.dtype, device=img.device)
    for r0, r1 in blocks(b, block):
        h = r1 - r0
        s = torch.matmul(scaled[r0:r1], txt_t, out=buf[:h])
        t = tmp[:h]
        row_max = s.amax(dim=1)
        torch.sub(s, row_max[:, None], out=t).exp_()
        row_lse[r0:r1] = row_max + t.sum(dim=1).log_()
        new_max = torch.maximum(col_max, s.amax(dim=0))
        torch.sub(s, new_max[None, :], out=t).exp_()
        col_sum.mul_(torch.exp(col_max - new_max)).add_(t.sum(dim=0))
        col_max = new_max
    return row_lse, col_max + col_sum.log()


def negclip_regulariser(
    img: Rows,
    txt: Rows,
    batching: Batching,
    tau: float,
    block: int = NEGCLIP_BLOCK,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """R_i(b(i)) = (τ/2)·[lse_j s_ij/τ + lse_j s_ji/τ] for every window row, float64."""
    dev = torch_device(device)
    out = np.full(len(img), np.nan, dtype=np.float64)
    for members, scored in zip(batching.index, batching.scored, strict=True):
        f = torch.from_numpy(as_f32(img, members)).to(dev)
        g = torch.from_numpy(as_f32(txt, members)).to(dev)
        row_lse, col_lse = batch_logsumexp(f, g, tau, block)
        r = (0.5 * tau) * (row_lse.double() + col_lse.double())
        out[members[scored]] = r.cpu().numpy()[scored]
    return out


def negclip_from_batchings(
    img: Rows,
    txt: Rows,
    batchings: Iterable[Batching],
    tau: float,
    block: int = NEGCLIP_BLOCK,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """negclip_i = s_ii − mean_k R_i(b_k(i)) for a given batch assignment, float32."""
    n = len(img)
    if len(txt) != n:
        raise ValueError(f"img has {n} rows but txt has {len(txt)}")
    if tau <= 0:
        raise ValueError(f"temperature must be > 0, got {tau}")
    total = np.zeros(n, dtype=np.float64)
    count = 0
    for batching in batchings:
        total += negclip_regulariser(img, txt, batching, tau, block, device)
        count += 1
    if count == 0:
        raise ValueError("negclip needs at least one batching")
    clip = clipscore(img, txt).astype(np.float64)
    return (clip - total / count).astype(np.float32)


def negclip_scores(
    img: Rows,
    txt: Rows,
    *,
    tau: float,
    batch_size: int,
    k: int,
    seed: Seed,
    block: int = NEGCLIP_BLOCK,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """negCLIPLoss of every pair of one window (SPEC §4): K seeded batchings of exactly B pairs."""
    if k < 1 or batch_size < 1:
        raise ValueError(f"negclip needs k >= 1 and batch_size >= 1, got k={k}, B={batch_size}")
    batchings = (negclip_batching(len(img), batch_size, seed, kk) for kk in range(k))
    return negclip_from_batchings(img, txt, batchings, tau, block, device)
