"""Score math against independent slow implementations (float64 loops, brute force)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmcurate.curate.normsim import (
    MaxAbsIndex,
    estimate_recall,
    gram,
    normsim_2,
    normsim_d_keep,
    normsim_d_run,
    normsim_inf_exact,
    normsim_p,
)
from mmcurate.curate.precision import resolve_precision, round_to_tf32
from mmcurate.curate.scores import (
    batch_logsumexp,
    batch_logsumexps,
    clipscore,
    negclip_batching,
    negclip_batchings,
    negclip_from_batchings,
    negclip_scores,
)


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def matched_pairs(n: int, d: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pairs whose text is a small perturbation of the image: s_ii close to 1."""
    rng = np.random.default_rng(seed)
    img = unit(rng, n, d)
    txt = img + noise * rng.standard_normal((n, d)).astype(np.float32)
    return img, (txt / np.linalg.norm(txt, axis=1, keepdims=True)).astype(np.float32)


def oracle_negclip(img, txt, batchings, tau) -> np.ndarray:
    """SPEC §4 written out with explicit float64 loops, no max-shift, no vectorised lse."""
    f = img.astype(np.float64)
    g = txt.astype(np.float64)
    n = len(f)
    reg = np.zeros(n)
    for b in batchings:
        for members, scored in zip(b.index, b.scored, strict=True):
            for a, i in enumerate(members):
                if not scored[a]:
                    continue
                row = sum(math.exp(float(f[i] @ g[j]) / tau) for j in members)
                col = sum(math.exp(float(f[j] @ g[i]) / tau) for j in members)
                reg[i] += tau / 2 * (math.log(row) + math.log(col))
    return np.array([f[i] @ g[i] for i in range(n)]) - reg / len(batchings)


def test_clipscore_is_the_pair_dot_product():
    img, txt = matched_pairs(50, 8, 0.5)
    expected = (img.astype(np.float64) * txt).sum(1)
    np.testing.assert_allclose(clipscore(img, txt, block=7), expected, atol=1e-6)


@pytest.mark.parametrize("n,batch", [(203, 64), (64, 64), (40, 64), (256, 64)])
def test_batching_holds_exactly_b_pairs_and_scores_each_row_once(n, batch):
    for k in range(3):
        b = negclip_batching(n, batch, seed=(5, 1), k=k)
        size = min(batch, n)
        assert b.index.shape[1] == size
        scored_rows = b.index[b.scored]
        assert np.array_equal(np.sort(scored_rows), np.arange(n))
        for members in b.index:
            assert len(set(members.tolist())) == size
        tail = b.index[-1]
        fillers = tail[~b.scored[-1]]
        assert not set(fillers.tolist()) & set(tail[b.scored[-1]].tolist())
        assert fillers.size == (-n) % size


@pytest.mark.parametrize("tau,noise", [(0.07, 0.6), (0.01, 0.02)])
def test_negclip_matches_float64_loop_oracle(tau, noise):
    img, txt = matched_pairs(150, 16, noise, seed=1)
    if tau == 0.01:
        assert (img * txt).sum(1).min() > 0.99
    batchings = negclip_batchings(len(img), 48, k=3, seed=7)
    expected = oracle_negclip(img, txt, batchings, tau)
    for block in (5, 48):
        got = negclip_from_batchings(img, txt, batchings, tau, block=block)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_blocked_logsumexp_handles_logits_that_overflow_exp():
    img, txt = matched_pairs(64, 16, 0.0)
    f, g = torch.from_numpy(img), torch.from_numpy(txt)
    assert torch.isinf(torch.exp((f @ g.t()) / 0.001)).any()
    rows, cols = batch_logsumexp(f, g, 0.001, block=10)
    ref = torch.logsumexp((f.double() @ g.double().t()) / 0.001, dim=1)
    torch.testing.assert_close(rows.double(), ref, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(cols.double(), ref, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("tau", [0.01, 0.07])
@pytest.mark.parametrize("n,batch", [(100, 32), (96, 32), (20, 32)])
def test_identical_pairs_score_minus_tau_log_b_tail_included(tau, n, batch):
    v = np.zeros((n, 8), dtype=np.float32)
    v[:, 0] = 1.0
    got = negclip_scores(v, v, tau=tau, batch_size=batch, k=4, seed=3)
    expected = -tau * math.log(min(batch, n))
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_negclip_is_deterministic_per_seed_and_equals_its_assignment():
    img, txt = matched_pairs(130, 16, 0.8, seed=2)
    a = negclip_scores(img, txt, tau=0.05, batch_size=32, k=3, seed=(1, 4))
    b = negclip_scores(img, txt, tau=0.05, batch_size=32, k=3, seed=(1, 4))
    c = negclip_scores(img, txt, tau=0.05, batch_size=32, k=3, seed=(1, 5))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    same = negclip_from_batchings(img, txt, negclip_batchings(130, 32, 3, (1, 4)), 0.05)
    assert np.array_equal(a, same)


def test_normsim_2_gram_matches_brute_force():
    rng = np.random.default_rng(3)
    t, x = unit(rng, 700, 24), unit(rng, 300, 24)
    brute = np.sqrt(((x.astype(np.float64) @ t.T.astype(np.float64)) ** 2).sum(1))
    np.testing.assert_allclose(normsim_2(x, gram(t, block=100), block=64), brute, atol=1e-5)


def test_normsim_inf_is_max_absolute_similarity_with_negative_targets():
    rng = np.random.default_rng(4)
    x = unit(rng, 200, 16)
    t = np.concatenate([unit(rng, 100, 16), -x[:50] * 0.999 - 0.001 * unit(rng, 50, 16)])
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    sims = x.astype(np.float64) @ t.T
    brute = np.abs(sims).max(1)
    assert (brute[:50] > sims.max(1)[:50] + 0.1).all()
    index = MaxAbsIndex(t, "flat")
    np.testing.assert_allclose(index.search(x, block=33), brute, atol=1e-6)
    np.testing.assert_allclose(normsim_inf_exact(x, t, 17, 40), brute, atol=1e-6)
    assert estimate_recall(index, t, x) == 1.0


def test_ivf_probing_every_list_is_exact_and_recall_is_measured():
    rng = np.random.default_rng(5)
    t, x = unit(rng, 2000, 16), unit(rng, 300, 16)
    full = MaxAbsIndex(t, "ivf", nlist=8, nprobe=8)
    assert estimate_recall(full, t, x) == 1.0
    np.testing.assert_allclose(full.search(x), np.abs(x @ t.T).max(1), atol=1e-6)
    sparse = MaxAbsIndex(t, "ivf", nlist=32, nprobe=1)
    assert estimate_recall(sparse, t, x) < 1.0


@pytest.mark.parametrize("p", [3.0, 10.0, 2.0, 1.5])
def test_normsim_p_matches_brute_force(p):
    rng = np.random.default_rng(6)
    t, x = unit(rng, 500, 16), unit(rng, 120, 16)
    brute = (np.abs(x.astype(np.float64) @ t.T.astype(np.float64)) ** p).sum(1) ** (1 / p)
    got = normsim_p(x, t, p, block=50, target_block=128)
    np.testing.assert_allclose(got, brute, rtol=1e-5)


def test_normsim_p_large_exponent_does_not_underflow():
    rng = np.random.default_rng(7)
    t, x = 0.05 * unit(rng, 50, 8), unit(rng, 10, 8)
    got = normsim_p(x, t, 400.0)
    brute = np.abs(x.astype(np.float64) @ t.T.astype(np.float64)).max(1)
    assert np.all(got > 0)
    np.testing.assert_allclose(got, brute, rtol=0.02)


def oracle_normsim_d(x: np.ndarray, n_target: int, num_iters: int, seed: int) -> np.ndarray:
    """SPEC §4 NormSim-D in memory, float64, S recomputed from scratch every step."""
    x = x.astype(np.float64)
    n = len(x)
    sample = np.random.default_rng(seed).choice(n, size=math.ceil(n / 10), replace=False)
    s = x[sample].T @ x[sample] / len(sample)
    kept = list(range(n))
    step = math.ceil((n - n_target) / num_iters)
    for _ in range(num_iters):
        scores = {i: float(x[i] @ s @ x[i]) for i in kept}
        order = sorted(kept, key=lambda i: (scores[i], -i))
        dropped = set(order[: min(step, len(kept) - n_target)])
        kept = [i for i in kept if i not in dropped]
        if len(kept) == n_target:
            break
        s = x[kept].T @ x[kept] / len(kept)
    mask = np.zeros(n, dtype=bool)
    mask[kept] = True
    return mask


class CountingRows:
    """A row source that records the largest read and the rows read in all."""

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr
        self.largest = 0
        self.total = 0

    def __len__(self) -> int:
        return len(self.arr)

    def __getitem__(self, key):
        out = self.arr[key]
        self.largest = max(self.largest, len(out))
        self.total += len(out)
        return out


def clustered_pool(tmp_path, n: int = 500, d: int = 12) -> np.ndarray:
    rng = np.random.default_rng(8)
    centres = unit(rng, 4, d)
    x = centres[rng.integers(0, 4, n)] + 0.7 * rng.standard_normal((n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    path = tmp_path / "pool.f16"
    x.tofile(path)
    return np.memmap(path, dtype=np.float16, mode="r", shape=x.shape)


@pytest.mark.parametrize("n_target,num_iters", [(120, 7), (300, 500), (1, 3), (100, 50)])
@pytest.mark.parametrize("memory_rows", [8, 450, None])
def test_normsim_d_matches_in_memory_oracle(tmp_path, n_target, num_iters, memory_rows):
    mm = clustered_pool(tmp_path)
    chunks = [CountingRows(mm[:170]), CountingRows(mm[170:171]), CountingRows(mm[171:])]
    budget = {} if memory_rows is None else {"memory_bytes": memory_rows * 2 * 12}
    mask, reads = normsim_d_run(chunks, n_target, num_iters=num_iters, seed=2, block=64, **budget)
    assert mask.dtype == bool and mask.shape == (500,)
    assert mask.sum() == n_target
    assert np.array_equal(mask, oracle_normsim_d(np.asarray(mm), n_target, num_iters, seed=2))
    assert max(c.largest for c in chunks) <= 64
    assert sum(c.total for c in chunks) == reads.rows


@pytest.mark.parametrize("n_target,num_iters", [(120, 7), (300, 500), (100, 50)])
def test_normsim_d_reads_a_pool_that_fits_its_budget_once(tmp_path, n_target, num_iters):
    """The 10% sample and one pass; every later step runs from memory."""
    mm = clustered_pool(tmp_path)
    chunks = [CountingRows(mm[:250]), CountingRows(mm[250:])]
    normsim_d_keep(chunks, n_target, num_iters=num_iters, seed=2, block=64)
    probe = 1  # the first row, read for the dimension
    assert sum(c.total for c in chunks) == probe + math.ceil(500 / 10) + 500


def test_normsim_d_breaks_ties_by_the_smaller_uid():
    x = np.tile(np.eye(1, 6, dtype=np.float32), (50, 1))
    rng = np.random.default_rng(4)
    uids = np.zeros(50, dtype=np.dtype("u8,u8"))
    uids["f0"] = rng.permutation(50) // 10
    uids["f1"] = rng.integers(0, 2**63, 50)
    mask = normsim_d_keep([x[:20], x[20:]], 20, num_iters=3, uids=uids)
    smallest = np.lexsort((uids["f1"], uids["f0"]))[:20]
    assert np.array_equal(np.flatnonzero(mask), np.sort(smallest))


def test_normsim_d_ties_without_uids_keep_lower_index_and_edges():
    x = np.tile(np.eye(1, 6, dtype=np.float32), (50, 1))
    mask = normsim_d_keep([x[:20], x[20:]], 20, num_iters=3)
    assert np.array_equal(np.flatnonzero(mask), np.arange(20))
    assert normsim_d_keep([x], 50, num_iters=5).all()
    assert not normsim_d_keep([x], 0, num_iters=5).any()
    with pytest.raises(ValueError):
        normsim_d_keep([x], 51, num_iters=5)


# --------------------------------------------------------------------------- precision


def test_tf32_rounding_keeps_ten_mantissa_bits_ties_to_even():
    x = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-10 + 2**-11, -(1 + 2**-12), 0.1])
    got = round_to_tf32(x)
    assert got[:4].tolist() == [1.0, 1 + 2**-9, 1 + 2**-9, -1.0]
    assert abs(got[4].item() - 0.1) <= 0.1 * 2**-11
    assert int((got.view(torch.int32) & 0x1FFF).abs().sum()) == 0
    halves = torch.from_numpy(np.random.default_rng(0).standard_normal(1000).astype(np.float16))
    assert torch.equal(round_to_tf32(halves.float()), halves.float())


def test_precisions_run_the_same_path_with_rounded_inputs():
    img, txt = matched_pairs(300, 24, 0.6, seed=11)
    img16, txt16 = img.astype(np.float16), txt.astype(np.float16)
    batchings = negclip_batchings(300, 64, 2, seed=3)
    run = {
        p: negclip_from_batchings(img16, txt16, batchings, 0.05, block=16, precision=p)
        for p in ("fp32", "tf32", "bf16")
    }
    assert np.array_equal(run["tf32"], run["fp32"]), "float16 rows are exact in TF32"
    rounded = [
        torch.from_numpy(a.astype(np.float32)).bfloat16().double().numpy() for a in (img16, txt16)
    ]
    f64 = [a.astype(np.float64) for a in (img16, txt16)]
    reference = (
        oracle_negclip(*rounded, batchings, 0.05)
        - np.einsum("ij,ij->i", *rounded)
        + np.einsum("ij,ij->i", *f64)
    )
    np.testing.assert_allclose(run["bf16"], reference, atol=2e-6)
    assert np.abs(run["bf16"] - run["fp32"]).max() > 1e-5, "bf16 must differ from fp32"


def test_several_taus_from_one_product_match_one_tau_at_a_time():
    img, txt = matched_pairs(128, 16, 0.5, seed=12)
    f, g = torch.from_numpy(img), torch.from_numpy(txt)
    both = batch_logsumexps(f, g, (0.01, 0.07), block=32)
    for tau, (rows, cols) in zip((0.01, 0.07), both, strict=True):
        one_rows, one_cols = batch_logsumexp(f, g, tau, block=32)
        assert torch.equal(rows, one_rows) and torch.equal(cols, one_cols)


def test_precision_resolution_on_the_cpu():
    cpu = torch.device("cpu")
    assert resolve_precision(None, cpu) == ("fp32", None)
    assert resolve_precision("fp32", cpu) == ("fp32", None)
    for asked in ("tf32", "bf16"):
        precision, note = resolve_precision(asked, cpu)
        assert precision == "fp32" and note == (
            f"--precision {asked}: the CPU has no fast {asked} matmul, using fp32"
        )
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", cpu)
