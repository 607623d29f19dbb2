"""Trajectory matching (SPEC §6, steps 2-5): constant-memory first order, and two references.

All three variants leave gradients in the `.grad` of the synthetic leaves (images, texts,
similarity parameters that require grad, and the step-size parameters: η itself, or log η with
`eta_param="log"`) and return the matching loss.
- `tesla`: constant memory. A first pass unrolls the student without a graph and sums
  G = Σ g_t; a second pass starts again from θ_0, recomputes one step's graph at a time,
  back-propagates ⟨∂L/∂G, g_t⟩ into the batch's rows and rebuilds θ_{t+1} = θ_t − η·g_t from
  the recomputed g_t, so no per-step parameters are kept. η gets the closed-form gradient with
  G held constant.
- `first-order-graph`: the same objective as one autograd graph over all steps, with θ_t
  detached between steps (the reference that `tesla` must equal; memory grows with steps).
- `full`: the second-order unroll of the original MTT (θ_t stays in the graph).

With `merge=True` (the reference's `--merge_loss_branches`) the X, Y and S gradients come from
(‖r_img‖² + ‖r_txt‖²) / (‖θ₀−θ*‖²_img + ‖θ₀−θ*‖²_txt) instead of the sum of the per-modality
ratios; η's gradient and the reported loss stay per modality, as in the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mmcurate.distill.losses import LossFn
from mmcurate.distill.similarity import FullSimilarity, LowRankSimilarity
from mmcurate.distill.students import Student

ETA_PARAMS = ("linear", "log")


@dataclass
class SyntheticSet:
    """What distillation learns: images X, text embeddings Y, similarity S and η per modality.

    `eta_img`/`eta_txt` are the learned step-size parameters: η itself (`eta_param` linear, the
    reference's) or ρ with η = exp(ρ) (`eta_param` log).
    """

    images: Tensor
    texts: Tensor
    sim: LowRankSimilarity | FullSimilarity
    eta_img: Tensor
    eta_txt: Tensor
    eta_param: str = "linear"

    def leaves(self) -> list[Tensor]:
        """The tensors that receive gradients (similarity only when it is learned)."""
        return [*self.inputs(), self.eta_img, self.eta_txt]

    def inputs(self) -> list[Tensor]:
        """The leaves other than the step sizes: X, Y and the learned similarity parameters."""
        sim = [p for p in self.sim.parameters() if p.requires_grad]
        return [self.images, self.texts, *sim]

    def etas(self) -> tuple[Tensor, Tensor]:
        """(η_img, η_txt) as differentiable functions of the step-size parameters."""
        if self.eta_param == "log":
            return self.eta_img.exp(), self.eta_txt.exp()
        return self.eta_img, self.eta_txt


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


def step_grads(
    student: Student,
    loss_fn: LossFn,
    syn: SyntheticSet,
    p_img: Tensor,
    p_txt: Tensor,
    idx: Tensor,
) -> tuple[Tensor, Tensor]:
    """The gradients at (p_img, p_txt) of the loss on one mini-batch, kept in the graph of X,
    Y and S so a matcher can differentiate through them."""
    target = syn.sim.block(idx)
    loss = step_loss(student, loss_fn, p_img, p_txt, syn.images, syn.texts, target, idx)
    return torch.autograd.grad(loss, [p_img, p_txt], create_graph=True)


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


def _denominators(n_img: Tensor, n_txt: Tensor, merge: bool) -> tuple[Tensor, Tensor]:
    """What each modality's matching term is divided by for the X, Y, S gradients."""
    return (n_img + n_txt, n_img + n_txt) if merge else (n_img, n_txt)


def match_tesla(
    student: Student,
    loss_fn: LossFn,
    syn: SyntheticSet,
    seg: Segment,
    batches: Sequence[Tensor],
    merge: bool = False,
) -> MatchResult:
    """Constant-memory first-order matching: peak memory does not grow with len(batches)."""
    device = syn.images.device
    eta_img, eta_txt = (e.detach() for e in syn.etas())
    images, texts = syn.images.detach(), syn.texts.detach()
    p_img, p_txt = seg.start_img.detach(), seg.start_txt.detach()
    g_img_sum = torch.zeros_like(p_img)
    g_txt_sum = torch.zeros_like(p_txt)
    states: list[tuple] = []
    for idx in batches:
        states.append(_rng_state(device))
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
    del p_img, p_txt
    after = _rng_state(device)

    d_img, d_txt, n_img, n_txt = _norms(seg)
    r_img = d_img - eta_img * g_img_sum
    r_txt = d_txt - eta_txt * g_txt_sum
    loss_img = r_img.pow(2).sum() / n_img
    loss_txt = r_txt.pow(2).sum() / n_txt
    den_img, den_txt = _denominators(n_img, n_txt, merge)
    c_img = -2 * eta_img * r_img / den_img
    c_txt = -2 * eta_txt * r_txt / den_txt

    inputs = syn.inputs()
    s_img, s_txt = seg.start_img.detach(), seg.start_txt.detach()
    for idx, rng in zip(batches, states, strict=True):
        _set_rng_state(rng, device)
        leaf_img = s_img.clone().requires_grad_(True)
        leaf_txt = s_txt.clone().requires_grad_(True)
        g_img, g_txt = step_grads(student, loss_fn, syn, leaf_img, leaf_txt, idx)
        inner = (c_img * g_img).sum() + (c_txt * g_txt).sum()
        torch.autograd.backward(inner, inputs=inputs)
        s_img = s_img - eta_img * g_img.detach()
        s_txt = s_txt - eta_txt * g_txt.detach()
    _set_rng_state(after, device)

    d_eta_img = -2 * (r_img * g_img_sum).sum() / n_img
    d_eta_txt = -2 * (r_txt * g_txt_sum).sum() / n_txt
    torch.autograd.backward(
        list(syn.etas()), grad_tensors=[d_eta_img, d_eta_txt], inputs=[syn.eta_img, syn.eta_txt]
    )
    return MatchResult(float(loss_img + loss_txt), float(loss_img), float(loss_txt))


def _backward(
    loss_img: Tensor, loss_txt: Tensor, syn: SyntheticSet, n_img: Tensor, n_txt: Tensor, merge
) -> MatchResult:
    """Per-modality losses into every leaf (with merge, X, Y, S get the merged ratio instead);
    the step's losses as numbers."""
    total = loss_img + loss_txt
    if not merge:
        torch.autograd.backward(total, inputs=syn.leaves())
    else:
        merged = (loss_img * n_img + loss_txt * n_txt) / (n_img + n_txt)
        torch.autograd.backward(merged, inputs=syn.inputs(), retain_graph=True)
        torch.autograd.backward(total, inputs=[syn.eta_img, syn.eta_txt])
    return MatchResult(float(total.detach()), float(loss_img.detach()), float(loss_txt.detach()))


def match_first_order_graph(
    student: Student,
    loss_fn: LossFn,
    syn: SyntheticSet,
    seg: Segment,
    batches: Sequence[Tensor],
    merge: bool = False,
) -> MatchResult:
    """The first-order objective as one autograd graph over all steps, θ_t detached per step."""
    eta_img, eta_txt = syn.etas()
    p_img, p_txt = seg.start_img.detach(), seg.start_txt.detach()
    g_img_sum: Tensor | float = 0.0
    g_txt_sum: Tensor | float = 0.0
    for idx in batches:
        leaf_img = p_img.clone().requires_grad_(True)
        leaf_txt = p_txt.clone().requires_grad_(True)
        g_img, g_txt = step_grads(student, loss_fn, syn, leaf_img, leaf_txt, idx)
        g_img_sum = g_img_sum + g_img
        g_txt_sum = g_txt_sum + g_txt
        p_img = p_img - eta_img.detach() * g_img.detach()
        p_txt = p_txt - eta_txt.detach() * g_txt.detach()
    d_img, d_txt, n_img, n_txt = _norms(seg)
    loss_img = (d_img - eta_img * g_img_sum).pow(2).sum() / n_img
    loss_txt = (d_txt - eta_txt * g_txt_sum).pow(2).sum() / n_txt
    return _backward(loss_img, loss_txt, syn, n_img, n_txt, merge)


def match_full(
    student: Student,
    loss_fn: LossFn,
    syn: SyntheticSet,
    seg: Segment,
    batches: Sequence[Tensor],
    merge: bool = False,
) -> MatchResult:
    """The second-order unroll of MTT: every θ_t stays in the graph (memory linear in steps)."""
    eta_img, eta_txt = syn.etas()
    p_img = seg.start_img.detach().clone().requires_grad_(True)
    p_txt = seg.start_txt.detach().clone().requires_grad_(True)
    for idx in batches:
        g_img, g_txt = step_grads(student, loss_fn, syn, p_img, p_txt, idx)
        p_img = p_img - eta_img * g_img
        p_txt = p_txt - eta_txt * g_txt
    _, _, n_img, n_txt = _norms(seg)
    loss_img = (p_img - seg.target_img).pow(2).sum() / n_img
    loss_txt = (p_txt - seg.target_txt).pow(2).sum() / n_txt
    return _backward(loss_img, loss_txt, syn, n_img, n_txt, merge)


MATCHERS = {
    "tesla": match_tesla,
    "first-order-graph": match_first_order_graph,
    "full": match_full,
}
