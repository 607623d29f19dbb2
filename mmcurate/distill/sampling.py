"""What each distillation iteration draws, as the LoRS reference draws it (SPEC §6).

- Experts: a cycle through a shuffled list of all experts, reshuffled for every cycle. The order
  of cycle c is a permutation seeded by (seed, c) only, so resuming needs no extra state.
- Start epoch: uniform on {0, …, max_start_epoch − 1} (the reference's
  `np.random.randint(0, max_start_epoch)`).
- Mini-batches: consecutive full slices of a random permutation of the N synthetic pairs; a new
  permutation whenever the next slice would run past N (e.g. 8 × 20 from two permutations of
  N = 99, 95 distinct rows on average).
- Initial pairs: N random real pairs (`random`, the reference's: an image may repeat through
  its several captions) or N pairs with distinct images (`distinct`).
"""

from __future__ import annotations

import numpy as np
import torch

from mmcurate.distill.buffers import derive_seed
from mmcurate.distill.data import PairSet
from mmcurate.errors import UsageError

INITS = ("random", "distinct")


def expert_order(seed: int, n_experts: int, cycle: int) -> list[int]:
    """The shuffled expert list of one cycle."""
    gen = torch.Generator().manual_seed(derive_seed(seed, 4, cycle))
    return torch.randperm(n_experts, generator=gen).tolist()


def expert_for(seed: int, n_experts: int, iteration: int) -> int:
    """The expert that iteration `iteration` matches."""
    cycle, position = divmod(iteration, n_experts)
    return expert_order(seed, n_experts, cycle)[position]


def start_epoch(max_start_epoch: int, gen: torch.Generator) -> int:
    """A start epoch drawn uniformly from {0, …, max_start_epoch − 1}."""
    return int(torch.randint(max_start_epoch, (1,), generator=gen))


def mini_batches(n: int, size: int, steps: int, gen: torch.Generator) -> list[torch.Tensor]:
    """`steps` mini-batches of min(size, n) distinct rows each: full slices of permutations."""
    size = min(size, n)
    perm, at = torch.randperm(n, generator=gen), 0
    out = []
    for _ in range(steps):
        if at + size > n:
            perm, at = torch.randperm(n, generator=gen), 0
        out.append(perm[at : at + size])
        at += size
    return out


def pick_init_pairs(pairs: PairSet, n: int, seed: int, mode: str = "distinct") -> np.ndarray:
    """N real pairs to start from: `random` pairs, or pairs with `distinct` images (one random
    caption of each of N random images)."""
    if mode not in INITS:
        raise UsageError(f"unknown init {mode!r}: choose from {', '.join(INITS)}")
    enough = pairs.n_pairs if mode == "random" else pairs.n_images
    if enough < n:
        raise UsageError(
            f"the real data has {pairs.n_images} images ({pairs.n_pairs} pairs), "
            f"fewer than N = {n} distilled pairs"
        )
    rng = np.random.default_rng(derive_seed(seed, 0))
    if mode == "random":
        return rng.permutation(pairs.n_pairs)[:n]
    images = rng.permutation(pairs.n_images)[:n]
    by_image: dict[int, list[int]] = {}
    for pair, image in enumerate(pairs.image_index):
        by_image.setdefault(int(image), []).append(pair)
    return np.array([by_image[int(i)][rng.integers(len(by_image[int(i)]))] for i in images])
