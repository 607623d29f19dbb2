"""SemDeDup math (SPEC §4): spherical k-means, nearest centroids, the order within a cluster,
and each member's largest cosine to an earlier member. Pure functions, no I/O.

The within-cluster values are exact whatever the tiling: float32 matmul tiles only pick the
candidate earlier members, and each candidate's cosine is then recomputed from the two rows
alone in float64 with a fixed summation order. So the value of a member is a function of the
cluster's rows and order, not of the block size, the BLAS, the device or the thread count.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from mmcurate.curate.rows import torch_device

KEEP_ORDERS = ("hard", "easy", "random")
FIRST_VALUE = -1.0  # a cluster's first member: no earlier member, so every threshold keeps it
EXACT_CHUNK = 1 << 22  # float64 elements per chunk of exact recomputation


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows as float32 of unit length (a zero row stays zero, so it is never NaN)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def _gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def train_centroids(x: np.ndarray, k: int, *, iterations: int, seed: int) -> np.ndarray:
    """Spherical FAISS k-means on every row of `x` (unit rows): (k, d) float32 unit centroids.

    FAISS keeps all the rows given (no second subsample) and says nothing about few points per
    centroid; it runs on all GPUs when faiss-gpu sees one, with the same call otherwise.
    """
    import faiss

    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= rows, got k={k} for {n} rows")
    kmeans = faiss.Kmeans(
        d,
        k,
        niter=iterations,
        spherical=True,
        seed=seed,
        gpu=_gpus() > 0,
        max_points_per_centroid=n,
        min_points_per_centroid=1,
        verbose=False,
    )
    kmeans.train(np.ascontiguousarray(x, dtype=np.float32))
    return unit_rows(kmeans.centroids)


def exact_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise aᵢ·bᵢ in float64: exact products, then numpy's fixed pairwise summation.

    The result depends only on the two rows, never on how the rows were batched.
    """
    return (np.asarray(a, dtype=np.float64) * np.asarray(b, dtype=np.float64)).sum(axis=1)


def nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each unit row's nearest centroid by cosine (FAISS flat inner product, on GPUs when
    present) and its cosine to that centroid, recomputed with `exact_dots`."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    if _gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    _, found = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    cluster = found[:, 0].astype(np.int32)
    return cluster, exact_dots(x, centroids[cluster])


def member_order(
    cos: np.ndarray,
    uids: np.ndarray,
    ids: np.ndarray,
    keep: str,
    seed: Sequence[int],
) -> np.ndarray:
    """Positions of a cluster's members in SemDeDup order: "hard" by cosine to the centroid
    ascending, "easy" descending, "random" a seeded shuffle; equal keys go to the smaller uid,
    then to the smaller id (`uids` are byte strings, so 32-hex uids compare in hex order).

    "random" draws one key per member in uid order from `default_rng(seed)`, so the order
    depends on the members and the seed, not on where they sit in the store.
    """
    if keep == "hard":
        key = np.asarray(cos, dtype=np.float64)
    elif keep == "easy":
        key = -np.asarray(cos, dtype=np.float64)
    elif keep == "random":
        canonical = np.lexsort((ids, uids))
        key = np.empty(len(ids), dtype=np.float64)
        key[canonical] = np.random.default_rng(list(seed)).random(len(ids))
    else:
        raise ValueError(f"keep must be one of {', '.join(KEEP_ORDERS)}, got {keep!r}")
    return np.lexsort((ids, uids, key))


def dot_margin(d: int) -> float:
    """A bound on twice the error of a float32 dot product of two unit d-vectors (γ_d ≈ d·2⁻²⁴),
    with room to spare: a row within it of the float32 maximum may be the exact maximum."""
    return 2.5 * d * 2.0**-24 + 1e-12


def _fold_exact(
    x: np.ndarray, best: np.ndarray, later: np.ndarray, earlier: np.ndarray, chunk: int
) -> None:
    """best[j] = max(best[j], exact xⱼ·xᵢ) over candidate pairs (later j, earlier i), j sorted."""
    for c0 in range(0, len(later), chunk):
        j = later[c0 : c0 + chunk]
        i = earlier[c0 : c0 + chunk]
        dots = exact_dots(x[j], x[i])
        starts = np.flatnonzero(np.r_[True, j[1:] != j[:-1]])
        rows = j[starts]
        best[rows] = np.maximum(best[rows], np.maximum.reduceat(dots, starts))


def _not_earlier(size: int, device: torch.device) -> torch.Tensor:
    """The mask of a diagonal tile of up to size × size: column i is not earlier than row j."""
    return _upper_triangle(1 << max(size - 1, 0).bit_length(), device)


@functools.lru_cache(maxsize=8)
def _upper_triangle(size: int, device: torch.device) -> torch.Tensor:
    return torch.ones(size, size, dtype=torch.bool, device=device).triu_()


def _candidates(
    s: torch.Tensor, running: torch.Tensor, margin: float
) -> tuple[np.ndarray, np.ndarray]:
    """Update each row's running float32 maximum with tile `s`; return the (row, column) pairs
    of the tile within `margin` of it, sorted by row. Most rows have one: the tile's argmax."""
    top, arg = s.max(dim=1)
    torch.maximum(running, top, out=running)
    threshold = torch.where(running > -torch.inf, running - margin, torch.inf)
    count = (s >= threshold[:, None]).sum(dim=1)
    single = torch.nonzero(count == 1).flatten()
    several = torch.nonzero(count > 1).flatten()
    rows, cols = [single.cpu().numpy()], [arg[single].cpu().numpy()]
    if len(several):
        jj, ii = (s[several] >= threshold[several, None]).nonzero(as_tuple=True)
        rows.append(several[jj].cpu().numpy())
        cols.append(ii.cpu().numpy())
    later, earlier = np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)
    order = np.argsort(later, kind="stable")
    return later[order], earlier[order]


def earlier_max(x: np.ndarray, block: int, device: str | torch.device | None = None) -> np.ndarray:
    """SemDeDup's triu(S, 1).max(0): for each row of `x` (unit rows, in cluster order) its
    largest cosine to any earlier row; the first row gets FIRST_VALUE. float32, never NaN.

    Memory is O(n·d + block²): later rows go in blocks of `block` against earlier blocks. Each
    tile keeps the pairs within `dot_margin` of the row's running float32 maximum, whose exact
    cosine then decides; every other pair is provably below the exact maximum.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    out = np.full(n, FIRST_VALUE, dtype=np.float32)
    if n < 2:
        return out
    dev = torch_device(device)
    xt = torch.from_numpy(x).to(dev)
    margin = dot_margin(d)
    chunk = max(1, EXACT_CHUNK // max(d, 1))
    running = torch.full((n,), -torch.inf, device=dev)
    best = np.full(n, -np.inf, dtype=np.float64)
    for j0 in range(0, n, block):
        j1 = min(j0 + block, n)
        for i0 in range(0, j1, block):
            i1 = min(i0 + block, j1)
            s = xt[j0:j1] @ xt[i0:i1].T
            if i1 > j0:  # the diagonal tile (i0 == j0): only earlier rows (i < j) count
                s.masked_fill_(_not_earlier(min(block, n), dev)[: j1 - j0, : i1 - i0], -torch.inf)
            later, earlier = _candidates(s, running[j0:j1], margin)
            if len(later):
                _fold_exact(x, best, later + j0, earlier + i0, chunk)
    out[1:] = best[1:].astype(np.float32)
    return out
