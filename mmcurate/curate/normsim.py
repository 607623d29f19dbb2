"""Score math of SPEC §4, part two: NormSim_p against a target set (2 through the Gram matrix,
∞ through FAISS, any p by blocked matmul) and NormSim-D. Pure functions, no I/O.

Embedding arguments are row sources (`curate.rows`), read block by block as float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from mmcurate.curate.rows import DEFAULT_BLOCK, Rows, as_f32, blocks, row_blocks, torch_device


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
    block: int = 2048,
    target_block: int = 8192,
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
    block: int = 2048,
    target_block: int = 8192,
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


# --------------------------------------------------------------------------- NormSim-D


def _chunk_offsets(chunks: Sequence[Rows]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)


def _outer_sum(
    chunks: Sequence[Rows], offsets: np.ndarray, rows: np.ndarray | None, block: int
) -> np.ndarray:
    """Σ f fᵀ (float64) over the given sorted global rows (None: all), reading only those rows."""
    d = np.asarray(chunks[0][:1]).shape[1]
    acc = np.zeros((d, d), dtype=np.float64)
    for c, chunk in enumerate(chunks):
        if rows is None:
            keys = [slice(b0, b1) for b0, b1 in blocks(len(chunk), block)]
        else:
            lo, hi = np.searchsorted(rows, [offsets[c], offsets[c + 1]])
            local = rows[lo:hi] - offsets[c]
            keys = [local[b0:b1] for b0, b1 in blocks(len(local), block)]
        for key in keys:
            f = as_f32(chunk, key).astype(np.float64)
            acc += f.T @ f
    return acc


def _quadratic_scores(
    chunks: Sequence[Rows],
    offsets: np.ndarray,
    keep: np.ndarray,
    s_mat: np.ndarray,
    block: int,
    dev: torch.device,
) -> np.ndarray:
    """xᵀSx for every kept row (float32; dropped rows get +inf), read block by block."""
    s_t = torch.from_numpy(s_mat.astype(np.float32)).to(dev)
    out = np.full(int(offsets[-1]), np.inf, dtype=np.float32)
    for c, chunk in enumerate(chunks):
        base = int(offsets[c])
        for r0, r1 in blocks(len(chunk), block):
            live = np.flatnonzero(keep[base + r0 : base + r1])
            if live.size == 0:
                continue
            xb = torch.from_numpy(as_f32(chunk, slice(r0, r1))[live]).to(dev)
            out[base + r0 + live] = ((xb @ s_t) * xb).sum(dim=1).cpu().numpy()
    return out


def _lowest(scores: np.ndarray, keep: np.ndarray, count: int) -> np.ndarray:
    """The `count` kept rows with the lowest score; at a tie the larger index goes first."""
    kept = np.flatnonzero(keep)
    ks = scores[kept]
    threshold = np.partition(ks, count - 1)[count - 1]
    below = kept[ks < threshold]
    tied = kept[ks == threshold]
    return np.sort(np.concatenate([below, tied[::-1][: count - below.size]]))


def normsim_d_keep(
    chunks: Sequence[np.ndarray],
    n_target: int,
    *,
    num_iters: int,
    seed: int = 0,
    block: int = DEFAULT_BLOCK,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """NormSim-D (SPEC §4): boolean keep-mask over the concatenated chunks, exactly n_target True.

    S starts as the mean f fᵀ over a seeded 10% sample (`default_rng(seed).choice(N, ceil(N/10),
    replace=False)`). Each step scores the kept rows by xᵀSx, drops the
    ceil((N − n_target)/num_iters) lowest (never past n_target; at equal score the larger row
    index is dropped first) and sets S to the mean f fᵀ of the kept set (by subtracting the
    dropped rows from the running sum). Chunks are read block by block, never concatenated.
    """
    offsets = _chunk_offsets(chunks)
    n = int(offsets[-1])
    if not 0 <= n_target <= n:
        raise ValueError(f"n_target must be in [0, {n}], got {n_target}")
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}")
    keep = np.ones(n, dtype=bool)
    if n_target == n:
        return keep
    if n_target == 0:
        return np.zeros(n, dtype=bool)
    dev = torch_device(device)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=math.ceil(n / 10), replace=False))
    s_mat = _outer_sum(chunks, offsets, sample, block) / sample.size
    kept_sum = _outer_sum(chunks, offsets, None, block)
    step = math.ceil((n - n_target) / num_iters)
    n_kept = n
    for _ in range(num_iters):
        scores = _quadratic_scores(chunks, offsets, keep, s_mat, block, dev)
        dropped = _lowest(scores, keep, min(step, n_kept - n_target))
        keep[dropped] = False
        n_kept -= dropped.size
        if n_kept == n_target:
            break
        kept_sum -= _outer_sum(chunks, offsets, dropped, block)
        s_mat = kept_sum / n_kept
    return keep
