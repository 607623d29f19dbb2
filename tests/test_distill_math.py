"""LoRS math: the similarity parameterisation, the losses, and the constant-memory gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmcurate.distill.losses import bce, get_loss, mse, soft_infonce, symmetric_ce, wbce
from mmcurate.distill.matching import (
    Segment,
    SyntheticSet,
    match_first_order_graph,
    match_full,
    match_tesla,
)
from mmcurate.distill.similarity import (
    FullSimilarity,
    LowRankSimilarity,
    make_similarity,
    similarity_from_export,
)
from mmcurate.distill.students import LOGIT_SCALE, build_student
from mmcurate.errors import UsageError


def test_similarity_starts_at_identity_and_blocks_match_the_matrix():
    gen = torch.Generator().manual_seed(0)
    low = LowRankSimilarity(7, 3, 2.0, gen)
    full = FullSimilarity(7)
    assert torch.equal(low.matrix(), torch.eye(7))
    assert torch.equal(full.matrix(), torch.eye(7))
    assert low.L.abs().sum() > 0 and torch.equal(low.R, torch.zeros(7, 3))
    with torch.no_grad():
        low.R.normal_(generator=gen)
        low.a.uniform_(0.5, 1.5, generator=gen)
        full.S.normal_(generator=gen)
    dense = torch.diag(low.a) + (2.0 / 3) * low.L @ low.R.T
    idx = torch.tensor([5, 1, 3])
    assert torch.allclose(low.block(idx), dense[idx][:, idx])
    assert torch.allclose(full.block(idx), full.S[idx][:, idx])


def test_export_round_trips_both_variants():
    gen = torch.Generator().manual_seed(1)
    low = LowRankSimilarity(5, 2, 1.0, gen)
    full = make_similarity(5, "full", 1.0)
    with torch.no_grad():
        low.R.normal_(generator=gen)
        full.S.normal_(generator=gen)
    for sim in (low, full):
        rebuilt = similarity_from_export(sim.export())
        assert torch.allclose(rebuilt.matrix(), sim.matrix().detach(), atol=1e-6)
    with pytest.raises(UsageError):
        LowRankSimilarity(5, 0, 1.0)


def _slow_wbce(logits, target):
    pos, neg, n_pos, n_neg = 0.0, 0.0, 0, 0
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            p = 1 / (1 + math.exp(-float(logits[i, j])))
            s = float(target[i, j])
            m = -s * math.log(p + 1e-6) - (1 - s) * math.log(1 - p + 1e-6)
            if s > 0.5:
                pos, n_pos = pos + m, n_pos + 1
            else:
                neg, n_neg = neg + m, n_neg + 1
    return 0.5 * (pos / n_pos + neg / n_neg)


def _slow_soft_infonce(logits, target):
    n = logits.shape[0]
    row = col = 0.0
    for i in range(n):
        z_row = sum(math.exp(float(logits[i, k])) for k in range(n))
        z_col = sum(math.exp(float(logits[k, i])) for k in range(n))
        for j in range(n):
            row -= float(target[i, j]) * (float(logits[i, j]) - math.log(z_row))
            col -= float(target[j, i]) * (float(logits[j, i]) - math.log(z_col))
    return 0.5 * (row / n + col / n)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wbce_and_soft_infonce_equal_slow_loops(seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 6, generator=gen, dtype=torch.float64) * 5
    target = torch.eye(6, dtype=torch.float64) + 0.3 * torch.randn(6, 6, generator=gen).double()
    assert wbce(logits, target).item() == pytest.approx(_slow_wbce(logits, target), rel=1e-10)
    got = soft_infonce(logits, target).item()
    assert got == pytest.approx(_slow_soft_infonce(logits, target), rel=1e-10)


def test_other_losses():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    eye = torch.eye(5, dtype=torch.float64)
    ce = 0.5 * (
        F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))
    )
    assert symmetric_ce(logits, eye).item() == pytest.approx(ce.item(), rel=1e-12)
    # with S = I the soft InfoNCE is exactly the symmetric cross-entropy
    assert soft_infonce(logits, eye).item() == pytest.approx(ce.item(), rel=1e-12)
    p = torch.sigmoid(logits)
    assert mse(logits, eye).item() == pytest.approx(((p - eye) ** 2).mean().item(), rel=1e-12)
    m = -(eye * torch.log(p + 1e-6) + (1 - eye) * torch.log(1 - p + 1e-6))
    assert bce(logits, eye).item() == pytest.approx(m.mean().item(), rel=1e-12)
    with pytest.raises(UsageError, match="unknown loss"):
        get_loss("hinge")


def test_student_logits_use_temperature_007():
    student = build_student("convnet-w4-d2", text_dim=6, image_size=8, seed=0).eval()
    x, y = torch.randn(3, 3, 8, 8), torch.randn(3, 6)
    f, g = student.image(x), student.text(y)
    expected = F.normalize(f, dim=1) @ F.normalize(g, dim=1).T / 0.07
    assert math.exp(LOGIT_SCALE) == pytest.approx(1 / 0.07)
    p_img, p_txt = student.flat()
    assert torch.allclose(student.logits(p_img, p_txt, x, y), expected, atol=1e-5)


def _problem(seed: int, full_sim: bool = False, encoder: str = "convnet-w6-d2", size: int = 8):
    """A tiny float64 student (dropout off), a synthetic set and an expert segment."""
    torch.manual_seed(seed)
    student = build_student(
        encoder, text_dim=10, image_size=size, seed=seed, dtype=torch.float64, dropout=0.0
    )
    n = 8
    sim = FullSimilarity(n) if full_sim else LowRankSimilarity(n, 3, 1.0)
    sim = sim.double()
    with torch.no_grad():
        for p in sim.parameters():
            p.add_(0.2 * torch.randn_like(p))
    syn = SyntheticSet(
        images=torch.randn(n, 3, size, size, dtype=torch.float64, requires_grad=True),
        texts=torch.randn(n, 10, dtype=torch.float64, requires_grad=True),
        sim=sim,
        eta_img=torch.tensor(0.05, dtype=torch.float64, requires_grad=True),
        eta_txt=torch.tensor(0.08, dtype=torch.float64, requires_grad=True),
    )
    p_img, p_txt = student.flat()
    seg = Segment(
        p_img,
        p_txt,
        p_img + 0.05 * torch.randn_like(p_img),
        p_txt + 0.05 * torch.randn_like(p_txt),
    )
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randperm(n, generator=gen)[:4] for _ in range(5)]
    return student, syn, seg, batches


def _grads(matcher, seed, loss="wbce", full_sim=False, **student):
    student, syn, seg, batches = _problem(seed, full_sim, **student)
    result = matcher(student, get_loss(loss), syn, seg, batches)
    names = ["X", "Y", *[n for n, _ in syn.sim.named_parameters()], "eta_img", "eta_txt"]
    return result, {n: t.grad.clone() for n, t in zip(names, syn.leaves(), strict=True)}


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


@pytest.mark.parametrize("loss", ["wbce", "infonce", "bce", "mse"])
@pytest.mark.parametrize("seed", [0, 1])
def test_constant_memory_gradient_equals_first_order_single_graph(loss, seed):
    tesla, g_tesla = _grads(match_tesla, seed, loss)
    graph, g_graph = _grads(match_first_order_graph, seed, loss)
    full, g_full = _grads(match_full, seed, loss)
    assert set(g_tesla) == {"X", "Y", "a", "L", "R", "eta_img", "eta_txt"}
    assert tesla.loss == pytest.approx(graph.loss, rel=1e-12)
    assert tesla.loss == pytest.approx(full.loss, rel=1e-12)
    for name in g_tesla:
        assert g_graph[name].norm() > 0, name
        assert _rel(g_tesla[name], g_graph[name]) < 1e-4, name
    cosines = {
        n: round(float(F.cosine_similarity(g_tesla[n].flatten(), g_full[n].flatten(), dim=0)), 3)
        for n in g_tesla
    }
    print(f"\nloss={loss} seed={seed} cosine(first-order, second-order unroll): {cosines}")


def test_constant_memory_gradient_timm_backbone_with_batch_norm():
    """The timm `mmc-tiny` student (a ResNet with BatchNorm) through functional_call."""
    _, g_tesla = _grads(match_tesla, 3, encoder="mmc-tiny", size=32)
    _, g_graph = _grads(match_first_order_graph, 3, encoder="mmc-tiny", size=32)
    for name in g_tesla:
        assert _rel(g_tesla[name], g_graph[name]) < 1e-4, name


def test_constant_memory_gradient_full_similarity_matrix():
    _, g_tesla = _grads(match_tesla, 2, full_sim=True)
    _, g_graph = _grads(match_first_order_graph, 2, full_sim=True)
    assert set(g_tesla) == {"X", "Y", "S", "eta_img", "eta_txt"}
    for name in g_tesla:
        assert _rel(g_tesla[name], g_graph[name]) < 1e-4, name


def test_constant_memory_replays_dropout_masks():
    """With dropout on, the recomputed steps see the masks of the first pass."""
    student, syn, seg, batches = _problem(4)
    student.text.dropout.p = 0.5
    torch.manual_seed(11)
    match_tesla(student, get_loss("wbce"), syn, seg, batches)
    g_tesla = [t.grad.clone() for t in syn.leaves()]
    for t in syn.leaves():
        t.grad = None
    torch.manual_seed(11)
    match_first_order_graph(student, get_loss("wbce"), syn, seg, batches)
    for a, b in zip(g_tesla, [t.grad for t in syn.leaves()], strict=True):
        assert _rel(a, b) < 1e-4


def test_symmetric_ce_leaves_similarity_without_gradient():
    student, syn, seg, batches = _problem(5)
    for p in syn.sim.parameters():
        p.requires_grad_(False)
    match_tesla(student, get_loss("ce"), syn, seg, batches)
    g_tesla = [t.grad.clone() for t in syn.leaves()]
    for t in syn.leaves():
        t.grad = None
    match_first_order_graph(student, get_loss("ce"), syn, seg, batches)
    assert len(g_tesla) == 4
    for a, b in zip(g_tesla, [t.grad for t in syn.leaves()], strict=True):
        assert _rel(a, b) < 1e-4
