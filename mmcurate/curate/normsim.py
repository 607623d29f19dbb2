"""Score math of SPEC §4, part two: NormSim_p against a target set (2 through the Gram matrix,
∞ through FAISS, any p by blocked matmul). Pure functions, no I/O. NormSim-D lives in
`curate.normsim_d_math` (re-exported here).

Embedding arguments are row sources (`curate.rows`), read block by block as float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mmcurate.curate.normsim_d_math import normsim_d_keep, normsim_d_run
from mmcurate.curate.rows import DEFAULT_BLOCK, Rows, as_f32, blocks, row_blocks, torch_device

__all__ = [
    "MaxAbsIndex",
    "estimate_recall",
    "gram",
    "normsim_2",
    "normsim_d_keep",
    "normsim_d_run",
    "normsim_inf_exact",
    "normsim_p",
]


PAIR_BLOCK = 2048  # candidates per block of the exact candidate-by-target matmuls
TARGET_BLOCK = 8192  # targets per block of the same


def gram(
    targets: Rows, block: int = DEFAULT_BLOCK, device: str | torch.device | None = None
) -> np.ndarray:
    """TᵀT (d×d, float64), the target set reduced once for exact NormSim_2.

    Each block's product runs in float32; the blocks are summed in float64.
    """
    if len(targets) == 0:
        raise ValueError("empty target set")
    dev = torch_device(device)
    acc = None
    for _, _, t in row_blocks(targets, block, dev):
        part = (t.t() @ t).double()
        acc = part if acc is None else acc.add_(part)
    return acc.cpu().numpy()


def normsim_2(
    x: Rows,
    gram_matrix: np.ndarray,
    block: int = DEFAULT_BLOCK,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """NormSim_2(x) = sqrt(xᵀ(TᵀT)x): O(d²) per candidate, whatever the target size."""
    dev = torch_device(device)
    g = torch.from_numpy(np.asarray(gram_matrix, dtype=np.float32)).to(dev)
    out = np.empty(len(x), dtype=np.float32)
    for r0, r1, xb in row_blocks(x, block, dev):
        quad = ((xb @ g) * xb).sum(dim=1).clamp_(min=0.0)
        out[r0:r1] = quad.sqrt_().cpu().numpy()
    return out


def normsim_p(
    x: Rows,
    targets: Rows,
    p: float,
    block: int = PAIR_BLOCK,
    target_block: int = TARGET_BLOCK,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """(Σ_t |tᵀx|^p)^(1/p) for any finite p > 0 by blocked matmul, never the full n×|T| matrix.

    Each candidate keeps a running max m and Σ(|s|/m)^p in float64, so large p neither
    overflows nor underflows to 0.
    """
    if not (p > 0 and math.isfinite(p)):
        raise ValueError(f"p must be finite and > 0, got {p}")
    dev = torch_device(device)
    t_blocks = [t for _, _, t in row_blocks(targets, target_block, dev)]
    out = np.empty(len(x), dtype=np.float32)
    for r0, r1, xb in row_blocks(x, block, dev):
        run_max = torch.zeros(r1 - r0, dtype=torch.float64, device=dev)
        run_sum = torch.zeros(r1 - r0, dtype=torch.float64, device=dev)
        for tb in t_blocks:
            s = (xb @ tb.t()).abs_().double()
            new_max = torch.maximum(run_max, s.amax(dim=1))
            safe = torch.where(new_max > 0, new_max, torch.ones_like(new_max))
            run_sum = run_sum * (run_max / safe) ** p + ((s / safe[:, None]) ** p).sum(dim=1)
            run_max = new_max
        out[r0:r1] = (run_max * run_sum ** (1.0 / p)).float().cpu().numpy()
    return out


def normsim_inf_exact(
    x: Rows,
    targets: Rows,
    block: int = PAIR_BLOCK,
    target_block: int = TARGET_BLOCK,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """max_t |tᵀx| by blocked torch matmul (the reference for recall and the benchmark)."""
    dev = torch_device(device)
    t_blocks = [t for _, _, t in row_blocks(targets, target_block, dev)]
    out = np.empty(len(x), dtype=np.float32)
    for r0, r1, xb in row_blocks(x, block, dev):
        best = torch.zeros(r1 - r0, dtype=torch.float32, device=dev)
        for tb in t_blocks:
            best = torch.maximum(best, (xb @ tb.t()).abs_().amax(dim=1))
        out[r0:r1] = best.cpu().numpy()
    return out


class MaxAbsIndex:
    """FAISS inner-product index answering max_t |tᵀx| by searching both x and −x.

    kind "flat" is exact; "ivf" (IVFFlat) and "hnsw" (HNSWFlat) are approximate, so callers
    report `estimate_recall`. On a machine with GPUs and faiss-gpu, flat and IVF indexes are
    moved to all GPUs with `index_cpu_to_all_gpus`; the calls are the same either way.
    """

    def __init__(
        self,
        targets: Rows,
        kind: str = "flat",
        nlist: int | None = None,
        nprobe: int | None = None,
        hnsw_m: int = 32,
        ef_search: int = 128,
        seed: int = 0,
    ) -> None:
        import faiss

        t = as_f32(targets, slice(0, len(targets)))
        n, d = t.shape
        if n == 0:
            raise ValueError("empty target set")
        self.kind = kind
        self.dim = d
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "ivf":
            self.nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39 or 1))
            self.nprobe = nprobe or min(self.nlist, max(4, self.nlist // 80))
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            index.train(t)
            index.nprobe = self.nprobe
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = ef_search
        else:
            raise ValueError(f"unknown index kind {kind!r}: use flat, ivf or hnsw")
        index.add(t)
        self.on_gpu = kind != "hnsw" and faiss.get_num_gpus() > 0
        self.index = faiss.index_cpu_to_all_gpus(index) if self.on_gpu else index

    def search(self, x: Rows, block: int = DEFAULT_BLOCK) -> np.ndarray:
        """max_t |tᵀx| per row of x (float32); exact for the flat index."""
        out = np.empty(len(x), dtype=np.float32)
        for r0, r1 in blocks(len(x), block):
            xb = as_f32(x, slice(r0, r1))
            if xb.shape[1] != self.dim:
                dim = xb.shape[1]
                raise ValueError(f"embedding dim {dim} does not match target dim {self.dim}")
            sims, _ = self.index.search(np.concatenate([xb, -xb]), 1)
            h = r1 - r0
            out[r0:r1] = np.maximum(sims[:h, 0], sims[h:, 0])
        return out


def estimate_recall(index: MaxAbsIndex, targets: Rows, queries: Rows) -> float:
    """Fraction of queries whose approximate max|tᵀx| equals the exact one (recall@1)."""
    if len(queries) == 0:
        return 1.0
    approx = index.search(queries)
    exact = normsim_inf_exact(queries, targets)
    return float(np.mean(approx >= exact - 1e-6 * np.maximum(1.0, np.abs(exact))))
