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
from mmcurate.distill.students import build_student
from mmcurate.errors import UsageError

EXACT = 1e-10


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


@pytest.mark.parametrize("temperature", [0.07, 0.1])
def test_student_logits_use_the_configured_temperature(temperature):
    student = build_student(
        "convnet-w4-d2", text_dim=6, image_size=8, seed=0, temperature=temperature
    ).eval()
    x, y = torch.randn(3, 3, 8, 8), torch.randn(3, 6)
    f, g = student.image(x), student.text(y)
    expected = F.normalize(f, dim=1) @ F.normalize(g, dim=1).T / temperature
    p_img, p_txt = student.flat()
    assert torch.allclose(student.logits(p_img, p_txt, x, y), expected, atol=1e-5)
    assert torch.allclose(student(x, y), expected, atol=1e-5)
    assert build_student("convnet-w4-d2", 6, 8, seed=0).temperature == 0.07
    with pytest.raises(UsageError, match="temperature must be > 0"):
        build_student("convnet-w4-d2", 6, 8, seed=0, temperature=0.0)


def _problem(
    seed: int,
    full_sim: bool = False,
    encoder: str = "convnet-w6-d2",
    size: int = 8,
    steps: int = 5,
    eta_param: str = "linear",
):
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
    eta_img, eta_txt = (0.05, 0.08) if eta_param == "linear" else (math.log(0.05), math.log(0.08))
    syn = SyntheticSet(
        images=torch.randn(n, 3, size, size, dtype=torch.float64, requires_grad=True),
        texts=torch.randn(n, 10, dtype=torch.float64, requires_grad=True),
        sim=sim,
        eta_img=torch.tensor(eta_img, dtype=torch.float64, requires_grad=True),
        eta_txt=torch.tensor(eta_txt, dtype=torch.float64, requires_grad=True),
        eta_param=eta_param,
    )
    p_img, p_txt = student.flat()
    seg = Segment(
        p_img,
        p_txt,
        p_img + 0.05 * torch.randn_like(p_img),
        p_txt + 0.05 * torch.randn_like(p_txt),
    )
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randperm(n, generator=gen)[:4] for _ in range(steps)]
    return student, syn, seg, batches


def _grads(matcher, seed, loss="wbce", full_sim=False, merge=False, **problem):
    student, syn, seg, batches = _problem(seed, full_sim, **problem)
    result = matcher(student, get_loss(loss), syn, seg, batches, merge)
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
        assert _rel(g_tesla[name], g_graph[name]) <= EXACT, name
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
        assert _rel(g_tesla[name], g_graph[name]) <= EXACT, name


def test_constant_memory_gradient_full_similarity_matrix():
    _, g_tesla = _grads(match_tesla, 2, full_sim=True)
    _, g_graph = _grads(match_first_order_graph, 2, full_sim=True)
    assert set(g_tesla) == {"X", "Y", "S", "eta_img", "eta_txt"}
    for name in g_tesla:
        assert _rel(g_tesla[name], g_graph[name]) <= EXACT, name


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("eta_param", ["linear", "log"])
def test_with_one_inner_step_tesla_equals_the_full_unroll(merge, eta_param):
    """One step from a fixed θ_0 has no Hessian term, so first order and second order agree."""
    tesla, g_tesla = _grads(match_tesla, 6, merge=merge, steps=1, eta_param=eta_param)
    full, g_full = _grads(match_full, 6, merge=merge, steps=1, eta_param=eta_param)
    assert tesla.loss == pytest.approx(full.loss, rel=1e-12)
    for name in g_tesla:
        assert g_full[name].norm() > 0, name
        assert _rel(g_tesla[name], g_full[name]) <= EXACT, name


def _merged_by_hand(seed, steps=5):
    """The reference's merged branches, written out: per step i, the gradient of
    2·[⟨η_i(θ*−θ₀) + η_i²G_i, g_i⟩_img + ⟨…⟩_txt] / (‖θ₀−θ*‖²_img + ‖θ₀−θ*‖²_txt)."""
    student, syn, seg, batches = _problem(seed, steps=steps)
    loss_fn = get_loss("wbce")
    eta_img, eta_txt = syn.eta_img.item(), syn.eta_txt.item()
    thetas, g_sum = [], None
    p_img, p_txt = seg.start_img.clone(), seg.start_txt.clone()
    for idx in batches:
        thetas.append((p_img, p_txt))
        a, b = p_img.clone().requires_grad_(True), p_txt.clone().requires_grad_(True)
        loss = loss_fn(student.logits(a, b, syn.images[idx], syn.texts[idx]), syn.sim.block(idx))
        g_img, g_txt = torch.autograd.grad(loss, [a, b])
        g_sum = (g_img, g_txt) if g_sum is None else (g_sum[0] + g_img, g_sum[1] + g_txt)
        p_img, p_txt = p_img - eta_img * g_img, p_txt - eta_txt * g_txt
    dist = (seg.start_img - seg.target_img).pow(2).sum() + (seg.start_txt - seg.target_txt).pow(
        2
    ).sum()
    single_img = eta_img * (seg.target_img - seg.start_img) + eta_img**2 * g_sum[0]
    single_txt = eta_txt * (seg.target_txt - seg.start_txt) + eta_txt**2 * g_sum[1]
    inputs = syn.inputs()
    for (t_img, t_txt), idx in zip(thetas, batches, strict=True):
        a, b = t_img.clone().requires_grad_(True), t_txt.clone().requires_grad_(True)
        loss = loss_fn(student.logits(a, b, syn.images, syn.texts)[idx][:, idx], syn.sim.block(idx))
        g_img, g_txt = torch.autograd.grad(loss, [a, b], create_graph=True)
        grand = (single_img @ g_img + single_txt @ g_txt) / dist
        torch.autograd.backward(2 * grand, inputs=inputs)
    return {n: t.grad.clone() for n, t in zip(["X", "Y", "a", "L", "R"], inputs, strict=True)}


def test_merged_loss_branches_follow_the_reference_formula():
    _, g_tesla = _grads(match_tesla, 7, merge=True)
    _, g_graph = _grads(match_first_order_graph, 7, merge=True)
    _, g_split = _grads(match_tesla, 7, merge=False)
    by_hand = _merged_by_hand(7)
    for name in by_hand:
        assert _rel(g_tesla[name], by_hand[name]) <= EXACT, name
        assert _rel(g_graph[name], by_hand[name]) <= EXACT, name
        assert _rel(g_split[name], by_hand[name]) > 1e-3, name
    # η keeps its per-modality gradient, as in the reference
    for name in ("eta_img", "eta_txt"):
        assert _rel(g_tesla[name], g_split[name]) <= EXACT, name


def test_log_step_sizes_get_the_chain_rule_gradient():
    """With η = exp(ρ), ∂L/∂ρ = η·∂L/∂η, and every other gradient is unchanged."""
    _, linear = _grads(match_tesla, 8)
    _, logs = _grads(match_tesla, 8, eta_param="log")
    for name, eta in (("eta_img", 0.05), ("eta_txt", 0.08)):
        assert _rel(logs[name], eta * linear[name]) <= EXACT, name
    for name in ("X", "Y", "a", "L", "R"):
        assert _rel(logs[name], linear[name]) <= EXACT, name


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
        assert _rel(a, b) <= EXACT


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
        assert _rel(a, b) <= EXACT
