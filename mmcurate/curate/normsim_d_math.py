"""NormSim-D (SPEC §4) with a bounded number of reads of the pool. Pure math over row sources.

The algorithm is SPEC §4's: S₁ is the mean f fᵀ of a seeded 10% sample; each step scores the
kept rows by xᵀSx, drops the ceil((N − n_target)/num_iters) lowest and sets S to the mean f fᵀ
of the kept set. Scores are float32 (from sums kept in float64); at equal score the row with
the larger uid (without uids: the larger index) is dropped first.

What changes is how often the rows are read. Rows are held in memory in their stored dtype
(float16 for a store) up to `memory_bytes` (default: a quarter of the machine's memory, at most
64 GiB). A *pass* scores every kept row under the current S, reading only the rows not held,
and then holds the lowest ones (a prefix of the pass's order) as far as the budget allows.
From step 2 on, S_t = K_t/n_t with K_t = Σ_kept f fᵀ, and the rows dropped since the pass,
D = Σ y yᵀ, only lower every score:

    q_t(x) = (n_s·q_s(x) − xᵀDx) / n_t  >=  (n_s·q_s(x) − λ_max(D)·|x|²) / n_t,

so a step needs the exact scores of the rows whose bound can reach the drop threshold only:
the held prefix, extended by reading just the rows it lacks. A new pass happens only when the
proof would need more rows than the budget holds.

Reads: a pool that fits the budget is read 1.1 times in all (the 10% sample for S₁, then one
pass; every later step runs from memory). A larger pool is read 1.1 times plus, per further
pass, its rows beyond the budget; passes are at most num_iters, and fewer as far as the bound
proves steps from memory (it does for clustered embeddings, less so for near-isotropic ones).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mmcurate.curate.rows import DEFAULT_BLOCK, Rows, as_f32, blocks

REL_MARGIN = 1e-4  # covers float32 rounding of the scores the bound compares


@dataclass
class Reads:
    """How much of the pool one NormSim-D run read, in rows."""

    passes: int = 0
    pass_rows: int = 0
    sample_rows: int = 0
    prefix_rows: int = 0
    probe_rows: int = 0
    memory_bytes: int = 0
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
        probe = np.asarray(chunks[0][0:1])
        self.dim, self.dtype = probe.shape[1], probe.dtype

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The given global rows (any order) as float32 (len, d), read block by block."""
        out = np.empty((len(rows), self.dim), dtype=np.float32)
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
        """(global rows, float32 rows) of the kept rows, block by block, in row order."""
        for c, chunk in enumerate(self.chunks):
            base = int(self.offsets[c])
            local = np.flatnonzero(keep[base : int(self.offsets[c + 1])])
            for b0, b1 in blocks(len(local), self.block):
                key = local[b0:b1]
                yield base + key, as_f32(chunk, key)


def quadratic(x: np.ndarray, s_mat: torch.Tensor) -> np.ndarray:
    """xᵀSx per row in float32 (S is float32; the sums S is built from are float64)."""
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return ((xt @ s_mat) * xt).sum(dim=1).numpy()


def as_matrix(s_mat: np.ndarray) -> torch.Tensor:
    """S (float64 sums) as the float32 matrix scores are computed with."""
    return torch.from_numpy(s_mat.astype(np.float32))


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


class Lowest:
    """The first `capacity` rows in drop order among those added, with their vectors: a
    bounded buffer that drops what can no longer make it."""

    def __init__(self, capacity: int, rank: np.ndarray, slack: int) -> None:
        self.capacity, self.rank, self.slack = capacity, rank, slack
        self.rows: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []
        self.vectors: list[np.ndarray] = []
        self.size = 0
        self.worst: tuple[float, int] | None = None

    def add(self, rows: np.ndarray, scores: np.ndarray, vectors: np.ndarray) -> None:
        """Offer rows; those behind the current last place are not kept."""
        if self.worst is not None:
            score, rank = self.worst
            ranks = self.rank[rows]
            fits = (scores < score) | ((scores == score) & (ranks > rank))
            rows, scores, vectors = rows[fits], scores[fits], vectors[fits]
        self.rows.append(rows)
        self.scores.append(scores)
        self.vectors.append(vectors)
        self.size += len(rows)
        if self.size > self.capacity + self.slack:
            self._prune()

    def _prune(self) -> None:
        rows, scores = np.concatenate(self.rows), np.concatenate(self.scores)
        first = drop_order(scores, self.rank[rows])[: self.capacity]
        vectors = np.concatenate(self.vectors)[first]
        self.rows, self.scores, self.vectors = [rows[first]], [scores[first]], [vectors]
        self.size = len(first)
        if self.size == self.capacity:
            self.worst = (float(scores[first[-1]]), int(self.rank[rows[first[-1]]]))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """The kept rows and their vectors, in drop order."""
        self._prune()
        return self.rows[0], self.vectors[0]


class Shrink:
    """One NormSim-D run: the keep mask, the running Σ f fᵀ of the kept rows, and the state of
    the current pass (its scores, their order, the prefix of that order held in memory)."""

    def __init__(self, pool: Pool, rank: np.ndarray, memory_bytes: int) -> None:
        self.pool = pool
        self.rank = rank
        self.hold = np.float16 if pool.dtype == np.float16 else np.float32
        self.memory_rows = max(1, int(memory_bytes) // (np.dtype(self.hold).itemsize * pool.dim))
        self.keep = np.ones(pool.n, dtype=bool)
        self.held = np.zeros(pool.n, dtype=bool)
        self.n_kept = pool.n
        self.kept_sum = np.zeros((pool.dim, pool.dim), dtype=np.float64)
        self.prefix = np.empty((0, pool.dim), dtype=self.hold)
        self.order = np.empty(0, dtype=np.int64)
        self.bounded = False
        self.reads = Reads()

    def drop(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Remove rows from the kept set and their f fᵀ from the running sum."""
        x = vectors.astype(np.float64)
        outer = x.T @ x
        self.keep[rows] = False
        self.n_kept -= len(rows)
        self.kept_sum -= outer
        self.dropped += outer

    def _held_blocks(self):
        """(global rows, float32 rows, stored rows) of the kept rows held in memory."""
        alive = np.flatnonzero(self.keep[self.order[: len(self.prefix)]])
        for b0, b1 in blocks(len(alive), self.pool.block):
            held = self.prefix[alive[b0:b1]]
            yield self.order[alive[b0:b1]], held.astype(np.float32), held

    def _read_blocks(self):
        """(global rows, float32 rows, stored rows) of the kept rows read from the pool."""
        for rows, x in self.pool.kept_blocks(self.keep & ~self.held):
            self.reads.pass_rows += len(rows)
            yield rows, x, x.astype(self.hold)

    def full_pass(self, s_mat: np.ndarray, with_sum: bool = False) -> None:
        """Score every kept row under S (held rows from memory, the others read once), sort
        the kept rows in drop order, and hold the first ones the budget allows. Only a pass
        under K/n (not the first, under S₁) bounds the scores of the steps after it."""
        s_t = as_matrix(s_mat)
        scores = np.full(self.pool.n, np.inf, dtype=np.float32)
        lowest = Lowest(self.memory_rows, self.rank, max(self.pool.block, self.memory_rows // 8))
        norm2 = 0.0
        for source in (self._held_blocks(), self._read_blocks()):
            for rows, x, stored in source:
                scores[rows] = quadratic(x, s_t)
                wide = x.astype(np.float64)
                norm2 = max(norm2, float((wide * wide).sum(axis=1).max()))
                if with_sum:
                    self.kept_sum += wide.T @ wide
                lowest.add(rows, scores[rows], stored)
        self.reads.passes += 1
        self.reads.per_pass_steps.append(0)
        kept = np.flatnonzero(self.keep)
        self.norm2 = norm2
        self.order = kept[drop_order(scores[kept], self.rank[kept])]
        self.sorted_scores = scores[self.order]
        self.n_pass = self.n_kept
        self.dropped = np.zeros_like(self.kept_sum)
        held_rows, self.prefix = lowest.result()
        self.held[:] = False
        self.held[held_rows] = True
        self.bounded = not with_sum
        self.last_needed = 0

    def extend_prefix(self, length: int) -> bool:
        """Hold the first `length` rows of the pass order in memory; False over the budget."""
        have = len(self.prefix)
        if length <= have:
            return True
        if length > self.memory_rows:
            return False
        rows = self.order[have:length]
        self.prefix = np.concatenate([self.prefix, self.pool.read(rows).astype(self.hold)])
        self.held[rows] = True
        self.reads.prefix_rows += len(rows)
        return True

    def first_of_pass(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `count` rows in the pass order, and their vectors (the step's drop)."""
        rows = self.order[:count]
        if self.extend_prefix(count):
            return rows, self.prefix[:count]
        self.reads.prefix_rows += count - len(self.prefix)
        return rows, np.concatenate([self.prefix, self.pool.read(rows[len(self.prefix) :])])

    def certified_step(self, count: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The step's `count` lowest rows under S = K/n, found from the in-memory prefix, or
        None when proving them would need more rows than the budget allows. When every kept
        row is held and the bound needed most of them last time, all are scored at once."""
        s_t = as_matrix(self.kept_sum / self.n_kept)
        everything = len(self.prefix) >= len(self.order)
        if everything and 2 * self.last_needed >= len(self.order):
            return self._lowest_held(count, len(self.order), s_t)[:2]
        slack = largest_eigenvalue(self.dropped) * self.norm2
        gone = self.n_pass - self.n_kept
        length = min(len(self.order), max(gone + max(2 * count, 1024), self.last_needed))
        while True:
            if not self.extend_prefix(length):
                return None
            found = self._lowest_held(count, length, s_t)
            if found is None:
                if length == len(self.order):
                    return None
                length = min(len(self.order), 2 * length)
                continue
            rows, vectors, theta = found
            reach = ((theta + abs(theta) * REL_MARGIN) * self.n_kept + slack) / self.n_pass
            reach = reach * (1 + REL_MARGIN) + 1e-30
            needed = int(np.searchsorted(self.sorted_scores, reach, side="right"))
            if needed <= length:
                self.last_needed = needed
                return rows, vectors
            length = min(len(self.order), max(needed, 2 * length))

    def _lowest_held(
        self, count: int, length: int, s_t: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, float] | None:
        """The `count` lowest kept rows among the first `length` of the pass order, scored
        exactly from memory, with the highest of their scores; None when fewer are kept."""
        positions = np.flatnonzero(self.keep[self.order[:length]])
        if len(positions) < count:
            return None
        exact = np.concatenate(
            [
                quadratic(self.prefix[positions[b0:b1]], s_t)
                for b0, b1 in blocks(len(positions), self.pool.block)
            ]
        )
        rows = self.order[positions]
        chosen = drop_order(exact, self.rank[rows])[:count]
        return rows[chosen], self.prefix[positions[chosen]], float(exact[chosen[-1]])


def default_memory_bytes() -> int:
    """A quarter of the machine's memory, at most 64 GiB: what NormSim-D may hold."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 16 * 2**30
    return int(min(64 * 2**30, physical // 4))


def normsim_d_run(
    chunks: Sequence[Rows],
    n_target: int,
    *,
    num_iters: int,
    seed: int = 0,
    block: int = DEFAULT_BLOCK,
    uids: np.ndarray | None = None,
    memory_bytes: int | None = None,
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
    budget = memory_bytes or default_memory_bytes()
    run = Shrink(pool, rank, budget)
    run.reads.memory_bytes = budget
    run.reads.probe_rows = 1  # the first row, read to learn the dimension
    sample = np.sort(np.random.default_rng(seed).choice(n, size=math.ceil(n / 10), replace=False))
    x = pool.read(sample).astype(np.float64)
    run.reads.sample_rows = len(sample)
    s_mat = x.T @ x / len(sample)
    step = math.ceil((n - n_target) / num_iters)
    for it in range(num_iters):
        count = min(step, run.n_kept - n_target)
        found = run.certified_step(count) if run.bounded else None
        if found is None:
            run.full_pass(s_mat if it == 0 else run.kept_sum / run.n_kept, with_sum=it == 0)
            found = run.first_of_pass(count)
        rows, vectors = found
        run.drop(rows, vectors)
        run.reads.steps += 1
        run.reads.per_pass_steps[-1] += 1
        if run.n_kept == n_target:
            break
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
    memory_bytes: int | None = None,
) -> np.ndarray:
    """NormSim-D (SPEC §4): boolean keep-mask over the concatenated chunks, exactly n_target
    True (see `normsim_d_run`; it runs on the CPU, `device` is accepted for compatibility)."""
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
