"""Trajectory matching (SPEC §6, steps 2-5): constant-memory first order, and two references.

All three variants leave gradients in the `.grad` of the synthetic leaves (images, texts,
similarity parameters that require grad, η_img, η_txt) and return the matching loss.
- `tesla`: constant memory. A first pass unrolls the student without a graph and sums
  G = Σ g_t; a second pass recomputes one step's graph at a time and back-propagates
  ⟨∂L/∂G, g_t⟩ into the batch's rows. η gets the closed-form gradient with G held constant.
- `first-order-graph`: the same objective as one autograd graph over all steps, with θ_t
  detached between steps (the reference that `tesla` must equal; memory grows with steps).
- `full`: the second-order unroll of the original MTT (θ_t stays in the graph).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mmcurate.distill.losses import LossFn
from mmcurate.distill.similarity import FullSimilarity, LowRankSimilarity
from mmcurate.distill.students import Student


@dataclass
class SyntheticSet:
    """What distillation learns: images X, text embeddings Y, similarity S and η per modality."""

    images: Tensor
    texts: Tensor
    sim: LowRankSimilarity | FullSimilarity
    eta_img: Tensor
    eta_txt: Tensor

    def leaves(self) -> list[Tensor]:
        """The tensors that receive gradients (similarity only when it is learned)."""
        sim = [p for p in self.sim.parameters() if p.requires_grad]
        return [self.images, self.texts, *sim, self.eta_img, self.eta_txt]


@dataclass(frozen=True)
class Segment:
    """One piece of an expert trajectory: start θ_e and target θ_{e+k}, per modality."""

    start_img: Tensor
    start_txt: Tensor
    target_img: Tensor
    target_txt: Tensor


@dataclass(frozen=True)
class MatchResult:
    """Matching loss of one iteration, total and per modality."""

    loss: float
    loss_img: float
    loss_txt: float


def step_loss(
    student: Student,
    loss_fn: LossFn,
    p_img: Tensor,
    p_txt: Tensor,
    images: Tensor,
    texts: Tensor,
    target: Tensor,
    idx: Tensor,
) -> Tensor:
    """The student loss on one mini-batch of the synthetic set, with its S sub-block."""
    return loss_fn(student.logits(p_img, p_txt, images[idx], texts[idx]), target)


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _norms(seg: Segment) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    d_img = seg.start_img - seg.target_img
    d_txt = seg.start_txt - seg.target_txt
    return d_img, d_txt, d_img.pow(2).sum(), d_txt.pow(2).sum()


def match_tesla(
    student: Student, loss_fn: LossFn, syn: SyntheticSet, seg: Segment, batches: Sequence[Tensor]
) -> MatchResult:
    """Constant-memory first-order matching: peak memory does not grow with len(batches)."""
    device = syn.images.device
    eta_img, eta_txt = syn.eta_img.detach(), syn.eta_txt.detach()
    images, texts = syn.images.detach(), syn.texts.detach()
    p_img, p_txt = seg.start_img.detach(), seg.start_txt.detach()
    g_img_sum = torch.zeros_like(p_img)
    g_txt_sum = torch.zeros_like(p_txt)
    snapshots: list[tuple[Tensor, Tensor, tuple]] = []
    for idx in batches:
        rng = _rng_state(device)
        snapshots.append((p_img, p_txt, rng))
        leaf_img = p_img.clone().requires_grad_(True)
        leaf_txt = p_txt.clone().requires_grad_(True)
        with torch.no_grad():
            target = syn.sim.block(idx)
        loss = step_loss(student, loss_fn, leaf_img, leaf_txt, images, texts, target, idx)
        g_img, g_txt = torch.autograd.grad(loss, [leaf_img, leaf_txt])
        g_img_sum += g_img
        g_txt_sum += g_txt
        p_img = p_img - eta_img * g_img
        p_txt = p_txt - eta_txt * g_txt
    after = _rng_state(device)

    d_img, d_txt, n_img, n_txt = _norms(seg)
    r_img = d_img - eta_img * g_img_sum
    r_txt = d_txt - eta_txt * g_txt_sum
    loss_img = r_img.pow(2).sum() / n_img
    loss_txt = r_txt.pow(2).sum() / n_txt
    c_img = -2 * eta_img * r_img / n_img
    c_txt = -2 * eta_txt * r_txt / n_txt

    inputs = [t for t in syn.leaves() if t is not syn.eta_img and t is not syn.eta_txt]
    for idx, (s_img, s_txt, rng) in zip(batches, snapshots, strict=True):
        _set_rng_state(rng, device)
        leaf_img = s_img.clone().requires_grad_(True)
        leaf_txt = s_txt.clone().requires_grad_(True)
        target = syn.sim.block(idx)
        loss = step_loss(student, loss_fn, leaf_img, leaf_txt, syn.images, syn.texts, target, idx)
        g_img, g_txt = torch.autograd.grad(loss, [leaf_img, leaf_txt], create_graph=True)
        inner = (c_img * g_img).sum() + (c_txt * g_txt).sum()
        torch.autograd.backward(inner, inputs=inputs)
    _set_rng_state(after, device)

    _add_grad(syn.eta_img, -2 * (r_img * g_img_sum).sum() / n_img)
    _add_grad(syn.eta_txt, -2 * (r_txt * g_txt_sum).sum() / n_txt)
    return MatchResult(float(loss_img + loss_txt), float(loss_img), float(loss_txt))


def _add_grad(leaf: Tensor, grad: Tensor) -> None:
    grad = grad.detach().reshape(leaf.shape)
    leaf.grad = grad.clone() if leaf.grad is None else leaf.grad + grad


def match_first_order_graph(
    student: Student, loss_fn: LossFn, syn: SyntheticSet, seg: Segment, batches: Sequence[Tensor]
) -> MatchResult:
    """The first-order objective as one autograd graph over all steps, θ_t detached per step."""
    p_img, p_txt = seg.start_img.detach(), seg.start_txt.detach()
    g_img_sum: Tensor | float = 0.0
    g_txt_sum: Tensor | float = 0.0
    for idx in batches:
        leaf_img = p_img.clone().requires_grad_(True)
        leaf_txt = p_txt.clone().requires_grad_(True)
        target = syn.sim.block(idx)
        loss = step_loss(student, loss_fn, leaf_img, leaf_txt, syn.images, syn.texts, target, idx)
        g_img, g_txt = torch.autograd.grad(loss, [leaf_img, leaf_txt], create_graph=True)
        g_img_sum = g_img_sum + g_img
        g_txt_sum = g_txt_sum + g_txt
        p_img = p_img - syn.eta_img.detach() * g_img.detach()
        p_txt = p_txt - syn.eta_txt.detach() * g_txt.detach()
    d_img, d_txt, n_img, n_txt = _norms(seg)
    loss_img = (d_img - syn.eta_img * g_img_sum).pow(2).sum() / n_img
    loss_txt = (d_txt - syn.eta_txt * g_txt_sum).pow(2).sum() / n_txt
    total = loss_img + loss_txt
    torch.autograd.backward(total, inputs=syn.leaves())
    return MatchResult(float(total.detach()), float(loss_img.detach()), float(loss_txt.detach()))


def match_full(
    student: Student, loss_fn: LossFn, syn: SyntheticSet, seg: Segment, batches: Sequence[Tensor]
) -> MatchResult:
    """The second-order unroll of MTT: every θ_t stays in the graph (memory linear in steps)."""
    p_img = seg.start_img.detach().clone().requires_grad_(True)
    p_txt = seg.start_txt.detach().clone().requires_grad_(True)
    for idx in batches:
        target = syn.sim.block(idx)
        loss = step_loss(student, loss_fn, p_img, p_txt, syn.images, syn.texts, target, idx)
        g_img, g_txt = torch.autograd.grad(loss, [p_img, p_txt], create_graph=True)
        p_img = p_img - syn.eta_img * g_img
        p_txt = p_txt - syn.eta_txt * g_txt
    _, _, n_img, n_txt = _norms(seg)
    loss_img = (p_img - seg.target_img).pow(2).sum() / n_img
    loss_txt = (p_txt - seg.target_txt).pow(2).sum() / n_txt
    total = loss_img + loss_txt
    torch.autograd.backward(total, inputs=syn.leaves())
    return MatchResult(float(total.detach()), float(loss_img.detach()), float(loss_txt.detach()))


MATCHERS = {
    "tesla": match_tesla,
    "first-order-graph": match_first_order_graph,
    "full": match_full,
}
