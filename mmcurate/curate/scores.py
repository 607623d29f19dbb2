"""Score math of SPEC §4, part one: CLIPScore and negCLIPLoss. Pure functions, no I/O.

Embedding arguments are row sources (`curate.rows`), read block by block as float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mmcurate.curate.precision import cuda_matmul, operand, product
from mmcurate.curate.rows import DEFAULT_BLOCK, Rows, as_f32, blocks, device_rows, torch_device

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


def batch_products(
    img: torch.Tensor, txt: torch.Tensor, precision: str = "fp32", block: int = NEGCLIP_BLOCK
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """S = img txtᵀ (B×B, float32) in row blocks (start, stop, block), in one reused buffer.

    `precision` sets the matmul (`curate.precision`); the products are float32 whatever it is.
    """
    b = img.shape[0]
    lhs, rhs_t = operand(img, precision), operand(txt, precision).t()
    block = max(1, min(int(block), b))
    buf = torch.empty((block, b), dtype=torch.float32, device=img.device)
    for r0, r1 in blocks(b, block):
        yield r0, r1, product(lhs[r0:r1], rhs_t, buf[: r1 - r0])


class BlockLse:
    """Row and column logsumexp of S/τ over one batch, fed S block by block: rows reduce within
    a block, columns keep an online (max, sum) across blocks. float32 throughout."""

    def __init__(self, b: int, block: int, tau: float, device: torch.device) -> None:
        self.scale = 1.0 / tau
        self.tmp = torch.empty((max(1, min(block, b)), b), dtype=torch.float32, device=device)
        self.row = torch.empty(b, dtype=torch.float32, device=device)
        self.col_max = torch.full((b,), -math.inf, dtype=torch.float32, device=device)
        self.col_sum = torch.zeros(b, dtype=torch.float32, device=device)

    def add(self, r0: int, r1: int, s: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
        """Take rows r0:r1 of S; S is scaled in place unless a `scratch` buffer is given."""
        h = r1 - r0
        x = s.mul_(self.scale) if scratch is None else torch.mul(s, self.scale, out=scratch[:h])
        t = self.tmp[:h]
        row_max = x.amax(dim=1)
        torch.sub(x, row_max[:, None], out=t).exp_()
        self.row[r0:r1] = row_max + t.sum(dim=1).log_()
        new_max = torch.maximum(self.col_max, x.amax(dim=0))
        torch.sub(x, new_max[None, :], out=t).exp_()
        self.col_sum.mul_(torch.exp(self.col_max - new_max)).add_(t.sum(dim=0))
        self.col_max = new_max

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lse_j s_ij/τ, lse_j s_ji/τ) for every i of the batch."""
        return self.row, self.col_max + self.col_sum.log()


def batch_logsumexps(
    img: torch.Tensor,
    txt: torch.Tensor,
    taus: Sequence[float],
    block: int = NEGCLIP_BLOCK,
    precision: str = "fp32",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`batch_logsumexp` at several τ from one matmul (a τ sweep costs one product)."""
    b = img.shape[0]
    sums = [BlockLse(b, block, tau, img.device) for tau in taus]
    scratch = torch.empty_like(sums[0].tmp) if len(sums) > 1 else None
    for r0, r1, s in batch_products(img, txt, precision, block):
        for i, acc in enumerate(sums):
            acc.add(r0, r1, s, None if i == len(sums) - 1 else scratch)
    return [acc.result() for acc in sums]


def batch_logsumexp(
    img: torch.Tensor,
    txt: torch.Tensor,
    tau: float,
    block: int = NEGCLIP_BLOCK,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column logsumexp of S/τ (S = img txtᵀ, B×B) in row blocks, memory O(B·block).

    Returns (lse_j s_ij/τ, lse_j s_ji/τ) for every i of the batch, float32. One matmul per block
    feeds both. `precision` sets the matmul; S/τ and the logsumexp are float32 always.
    """
    return batch_logsumexps(img, txt, (tau,), block, precision)[0]


def negclip_regulariser(
    img: torch.Tensor,
    txt: torch.Tensor,
    batching: Batching,
    tau: float,
    block: int = NEGCLIP_BLOCK,
    precision: str = "fp32",
    on_batch: Callable[[], None] | None = None,
) -> np.ndarray:
    """R_i(b(i)) = (τ/2)·[lse_j s_ij/τ + lse_j s_ji/τ] for every window row, float64.

    `img` and `txt` are the whole window on the compute device (`rows.device_rows`); each batch
    is gathered there by index, never through the host.
    """
    dev = img.device
    out = np.full(img.shape[0], np.nan, dtype=np.float64)
    for members, scored in zip(batching.index, batching.scored, strict=True):
        idx = torch.from_numpy(members).to(dev)
        f, g = img.index_select(0, idx), txt.index_select(0, idx)
        row_lse, col_lse = batch_logsumexp(f, g, tau, block, precision)
        r = (0.5 * tau) * (row_lse.double() + col_lse.double())
        out[members[scored]] = r.cpu().numpy()[scored]
        if on_batch is not None:
            on_batch()
    return out


def negclip_from_batchings(
    img: Rows,
    txt: Rows,
    batchings: Iterable[Batching],
    tau: float,
    block: int = NEGCLIP_BLOCK,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    on_batch: Callable[[], None] | None = None,
) -> np.ndarray:
    """negclip_i = s_ii − mean_k R_i(b_k(i)) for a given batch assignment, float32.

    The window goes to the device once, in its stored dtype (float16 for a store);
    `on_batch()` is called after every batch (progress).
    """
    n = len(img)
    if len(txt) != n:
        raise ValueError(f"img has {n} rows but txt has {len(txt)}")
    if tau <= 0:
        raise ValueError(f"temperature must be > 0, got {tau}")
    dev = torch_device(device)
    img_dev, txt_dev = device_rows(img, dev), device_rows(txt, dev)
    total = np.zeros(n, dtype=np.float64)
    count = 0
    with cuda_matmul(precision, dev):
        for batching in batchings:
            total += negclip_regulariser(
                img_dev, txt_dev, batching, tau, block, precision, on_batch
            )
            count += 1
    del img_dev, txt_dev
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
    precision: str = "fp32",
    on_batch: Callable[[], None] | None = None,
) -> np.ndarray:
    """negCLIPLoss of every pair of one window (SPEC §4): K seeded batchings of exactly B pairs."""
    if k < 1 or batch_size < 1:
        raise ValueError(f"negclip needs k >= 1 and batch_size >= 1, got k={k}, B={batch_size}")
    batchings = (negclip_batching(len(img), batch_size, seed, kk) for kk in range(k))
    return negclip_from_batchings(img, txt, batchings, tau, block, device, precision, on_batch)


def negclip_batch_count(n: int, batch_size: int, k: int) -> int:
    """How many batches `negclip_scores` runs over a window of n rows (for progress)."""
    return k * -(-n // min(batch_size, n)) if n else 0
