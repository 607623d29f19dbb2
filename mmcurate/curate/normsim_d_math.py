"""NormSim-D (SPEC §4) with a bounded number of reads of the pool. Pure math over row sources.

The algorithm is SPEC §4's: S₁ is the mean f fᵀ of a seeded 10% sample; each step scores the
kept rows by xᵀSx, drops the ceil((N − n_target)/num_iters) lowest and sets S to the mean f fᵀ
of the kept set. Scores are computed in float64 and compared as float32; at equal score the row
with the larger uid (without uids: the larger index) is dropped first.

What changes is how often the rows are read. A *pass* reads every kept row once and stores its
score q_s (4 bytes per row). From step 2 on, S_t = K_t/n_t with K_t = Σ_kept f fᵀ, and the rows
dropped since the pass, D = Σ y yᵀ, only lower every score:

    q_t(x) = (n_s·q_s(x) − xᵀDx) / n_t  >=  (n_s·q_s(x) − λ_max(D)·|x|²) / n_t.

So a step only needs the exact scores of the rows whose bound can reach the drop threshold:
a prefix of the pass's order, held in memory as float32 (at most `memory_bytes`) and extended by
reading just those rows. A new pass happens only when that prefix would outgrow the budget.
Reads: the 10% sample, the first pass (scores under S₁, and Σ f fᵀ), the second (scores under
K/n), one more per budget overflow, and each prefix row at most once per pass. When the kept
rows fit the budget, a pass keeps them all: then the pool is read 2.1 times in all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mmcurate.curate.rows import DEFAULT_BLOCK, Rows, as_f32, blocks

MEMORY_BYTES = 512 * 2**20
REL_MARGIN = 1e-6


@dataclass
class Reads:
    """How much of the pool one NormSim-D run read, in rows."""

    passes: int = 0
    pass_rows: int = 0
    sample_rows: int = 0
    prefix_rows: int = 0
    probe_rows: int = 0
    steps: int = 0
    per_pass_steps: list[int] = field(default_factory=list)

    @property
    def rows(self) -> int:
        """Every row read, counting a row once per read."""
        return self.pass_rows + self.sample_rows + self.prefix_rows + self.probe_rows


class Pool:
    """The candidates as chunks of row sources, read by global row index."""

    def __init__(self, chunks: Sequence[Rows], block: int) -> None:
        self.chunks = chunks
        self.block = block
        self.offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
        self.n = int(self.offsets[-1])
        self.dim = as_f32(chunks[0], slice(0, 1)).shape[1]

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The given global rows (any order) as float64 (len, d), read block by block."""
        out = np.empty((len(rows), self.dim), dtype=np.float64)
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        bounds = np.searchsorted(ordered, self.offsets)
        for c, chunk in enumerate(self.chunks):
            lo, hi = int(bounds[c]), int(bounds[c + 1])
            for b0, b1 in blocks(hi - lo, self.block):
                local = ordered[lo + b0 : lo + b1] - self.offsets[c]
                out[order[lo + b0 : lo + b1]] = as_f32(chunk, local)
        return out

    def kept_blocks(self, keep: np.ndarray):
        """(global rows, float64 rows) of the kept rows, block by block, in row order."""
        for c, chunk in enumerate(self.chunks):
            base = int(self.offsets[c])
            local = np.flatnonzero(keep[base : int(self.offsets[c + 1])])
            for b0, b1 in blocks(len(local), self.block):
                key = local[b0:b1]
                yield base + key, as_f32(chunk, key).astype(np.float64)


def quadratic(x: np.ndarray, s_mat: torch.Tensor) -> np.ndarray:
    """xᵀSx per row, computed in float64 and rounded to float32 (the compared score)."""
    xt = torch.from_numpy(x)
    return ((xt @ s_mat) * xt).sum(dim=1).numpy().astype(np.float32)


def drop_order(scores: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Positions sorted in drop order: lowest score first, at a tie the larger rank first."""
    return np.lexsort((-rank.astype(np.int64), scores))


def largest_eigenvalue(d_mat: np.ndarray) -> float:
    """An upper bound of λ_max of a PSD matrix (eigvalsh plus a rounding margin; ≤ trace)."""
    trace = float(np.trace(d_mat))
    if trace <= 0:
        return 0.0
    top = float(torch.linalg.eigvalsh(torch.from_numpy(d_mat))[-1])
    return min(trace, top + 1e-9 * trace)


class Shrink:
    """One NormSim-D run: the keep mask, the running Σ f fᵀ of the kept rows, and the state of
    the current pass (its scores, their order, the prefix held in memory)."""

    def __init__(self, pool: Pool, rank: np.ndarray, memory_bytes: int) -> None:
        self.pool = pool
        self.rank = rank
        self.memory_rows = max(1, int(memory_bytes) // (4 * pool.dim))
        self.keep = np.ones(pool.n, dtype=bool)
        self.n_kept = pool.n
        self.kept_sum = np.zeros((pool.dim, pool.dim), dtype=np.float64)
        self.reads = Reads()

    def drop(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Remove rows from the kept set and their f fᵀ from the running sum."""
        x = vectors.astype(np.float64)
        outer = x.T @ x
        self.keep[rows] = False
        self.n_kept -= len(rows)
        self.kept_sum -= outer
        self.dropped += outer

    def full_pass(self, s_mat: np.ndarray, with_sum: bool = False) -> None:
        """Score every kept row under S; sort the kept rows in drop order."""
        s_t = torch.from_numpy(s_mat)
        scores = np.full(self.pool.n, np.inf, dtype=np.float32)
        hold = self.n_kept <= self.memory_rows
        held: list[np.ndarray] = []
        norm2 = 0.0
        for rows, x in self.pool.kept_blocks(self.keep):
            scores[rows] = quadratic(x, s_t)
            norm2 = max(norm2, float((x * x).sum(axis=1).max()))
            if with_sum:
                self.kept_sum += x.T @ x
            if hold:
                held.append(x.astype(np.float32))
            self.reads.pass_rows += len(rows)
        self.reads.passes += 1
        self.reads.per_pass_steps.append(0)
        kept = np.flatnonzero(self.keep)
        self.norm2 = norm2
        by_score = drop_order(scores[kept], self.rank[kept])
        self.order = kept[by_score]
        self.sorted_scores = scores[self.order]
        self.n_pass = self.n_kept
        self.dropped = np.zeros_like(self.kept_sum)
        if hold and held:
            self.prefix = np.concatenate(held)[by_score]
        else:
            self.prefix = np.empty((0, self.pool.dim), dtype=np.float32)

    def extend_prefix(self, length: int) -> bool:
        """Hold the first `length` rows of the pass order in memory; False over the budget."""
        have = len(self.prefix)
        if length <= have:
            return True
        if length > self.memory_rows:
            return False
        rows = self.order[have:length]
        self.prefix = np.concatenate([self.prefix, self.pool.read(rows).astype(np.float32)])
        self.reads.prefix_rows += len(rows)
        return True

    def first_of_pass(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `count` rows in the pass order, and their vectors (the step's drop)."""
        rows = self.order[:count]
        if self.extend_prefix(count):
            return rows, self.prefix[:count]
        self.reads.prefix_rows += count
        return rows, self.pool.read(rows)

    def certified_step(self, count: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The step's `count` lowest rows under S = K/n, found from the in-memory prefix, or
        None when proving them would need more rows than the budget allows."""
        s_t = torch.from_numpy(self.kept_sum / self.n_kept)
        slack = largest_eigenvalue(self.dropped) * self.norm2
        gone = self.n_pass - self.n_kept
        length = min(len(self.order), gone + max(2 * count, 1024))
        while True:
            if not self.extend_prefix(length):
                return None
            alive = self.keep[self.order[:length]]
            positions = np.flatnonzero(alive)
            if len(positions) < count:
                if length == len(self.order):
                    return None
                length = min(len(self.order), 2 * length)
                continue
            exact = quadratic(self.prefix[positions].astype(np.float64), s_t)
            rows = self.order[positions]
            chosen = drop_order(exact, self.rank[rows])[:count]
            theta = float(exact[chosen[-1]])
            reach = ((theta + abs(theta) * REL_MARGIN) * self.n_kept + slack) / self.n_pass
            reach = reach * (1 + REL_MARGIN) + 1e-30
            needed = int(np.searchsorted(self.sorted_scores, reach, side="right"))
            if needed <= length:
                return rows[chosen], self.prefix[positions[chosen]]
            length = min(len(self.order), max(needed, 2 * length))


def normsim_d_run(
    chunks: Sequence[Rows],
    n_target: int,
    *,
    num_iters: int,
    seed: int = 0,
    block: int = DEFAULT_BLOCK,
    uids: np.ndarray | None = None,
    memory_bytes: int = MEMORY_BYTES,
) -> tuple[np.ndarray, Reads]:
    """NormSim-D: the keep mask over the concatenated chunks (exactly n_target True) and what
    it read. `uids`: (u8, u8) pairs per row, for ties (without them, the row index)."""
    pool = Pool(chunks, block) if len(chunks) else None
    n = pool.n if pool else 0
    if not 0 <= n_target <= n:
        raise ValueError(f"n_target must be in [0, {n}], got {n_target}")
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}")
    if n_target in (0, n):
        return np.full(n, n_target == n, dtype=bool), Reads()
    rank = np.arange(n) if uids is None else uid_rank(uids)
    run = Shrink(pool, rank, memory_bytes)
    run.reads.probe_rows = 1  # the first row, read to learn the dimension
    sample = np.sort(np.random.default_rng(seed).choice(n, size=math.ceil(n / 10), replace=False))
    x = pool.read(sample)
    run.reads.sample_rows = len(sample)
    s_mat = x.T @ x / len(sample)
    step = math.ceil((n - n_target) / num_iters)
    for it in range(num_iters):
        count = min(step, run.n_kept - n_target)
        found = run.certified_step(count) if it >= 2 and hasattr(run, "order") else None
        if found is None:
            run.full_pass(s_mat if it == 0 else run.kept_sum / run.n_kept, with_sum=it == 0)
            found = run.first_of_pass(count)
        rows, vectors = found
        run.drop(rows, vectors)
        run.reads.steps += 1
        run.reads.per_pass_steps[-1] += 1
        if run.n_kept == n_target:
            break
        if it == 0:
            del run.order  # step 2 scores under K/n, which step 1's pass does not bound
    return run.keep, run.reads


def uid_rank(uids: np.ndarray) -> np.ndarray:
    """Each row's position in uid order (hex order of the 32-character uids)."""
    pairs = np.asarray(uids)
    hi, lo = (pairs["f0"], pairs["f1"]) if pairs.dtype.names else (pairs[:, 0], pairs[:, 1])
    rank = np.empty(len(hi), dtype=np.int64)
    rank[np.lexsort((lo, hi))] = np.arange(len(hi))
    return rank


def normsim_d_keep(
    chunks: Sequence[Rows],
    n_target: int,
    *,
    num_iters: int,
    seed: int = 0,
    block: int = DEFAULT_BLOCK,
    device: str | torch.device | None = None,
    uids: np.ndarray | None = None,
    memory_bytes: int = MEMORY_BYTES,
) -> np.ndarray:
    """NormSim-D (SPEC §4): boolean keep-mask over the concatenated chunks, exactly n_target
    True (see `normsim_d_run`; the math runs in float64 on the CPU, `device` is accepted for
    compatibility)."""
    keep, _ = normsim_d_run(
        chunks,
        n_target,
        num_iters=num_iters,
        seed=seed,
        block=block,
        uids=uids,
        memory_bytes=memory_bytes,
    )
    return keep
