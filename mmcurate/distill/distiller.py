"""The LoRS outer loop: learn X, Y, S and η by trajectory matching against expert buffers."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mmcurate.data.atomic import torch_save_atomic
from mmcurate.distill.augment import ExpertAugment
from mmcurate.distill.buffers import Buffers, derive_seed, load_buffers
from mmcurate.distill.checkpoint import checkpoint_path, restore, state
from mmcurate.distill.data import PairSet, load_pairs
from mmcurate.distill.export import export_artifact
from mmcurate.distill.heap import keep_freed_heap
from mmcurate.distill.losses import get_loss
from mmcurate.distill.matching import MATCHERS, Segment, SyntheticSet
from mmcurate.distill.presets import DistillConfig
from mmcurate.distill.sampling import expert_for, mini_batches, pick_init_pairs, start_epoch
from mmcurate.distill.similarity import make_similarity
from mmcurate.distill.sources import absolute_data
from mmcurate.distill.students import Student, build_student, normalize_images
from mmcurate.distill.towers import check_tower_weights, math_attention
from mmcurate.errors import MmcurateError, UsageError
from mmcurate.progress import progress_bar

SAVE_EVERY = 100
# What the data and the buffers must share, and the line that says they do not (data of an
# unknown text encoder, "", is not checked).
DATA_PINS = (
    ("text_encoder", "the data's texts were encoded with {data!r}, the buffers' with {buffers!r}"),
    (
        "text_dim",
        "the data's text features have dimension {data}, the buffers' {buffers}: use the "
        "buffers' text encoder {encoder}",
    ),
    ("image_size", "the data's images are {data} px, the buffers' {buffers} px"),
    ("resize", "the data's images were resized with {data!r}, the buffers' with {buffers!r}"),
)


def initial_images(
    pairs: PairSet, chosen: np.ndarray, config: DistillConfig, meta: dict
) -> torch.Tensor:
    """The N real images X starts from, augmented as the experts' (unless config.augment is
    off) and normalised with the buffers' mean/std."""
    pixels = pairs.pixels(chosen)
    if config.augment:
        gen = torch.Generator().manual_seed(derive_seed(config.seed, 5))
        pixels = ExpertAugment(pairs.image_size)(pixels, gen)
    return normalize_images(pixels, meta["mean"], meta["std"])


def _synthetic_from_real(
    pairs: PairSet, chosen: np.ndarray, config: DistillConfig, meta: dict, device: torch.device
) -> SyntheticSet:
    """X and Y from N real pairs, S = I, η = eta_init (stored as log η with eta_param log)."""
    gen = torch.Generator().manual_seed(derive_seed(config.seed, 1))
    sim = make_similarity(config.pairs, config.rank, config.alpha, gen)
    sim.requires_grad_(config.learn_sim)
    eta = float(np.log(config.eta_init)) if config.eta_param == "log" else config.eta_init
    return SyntheticSet(
        images=initial_images(pairs, chosen, config, meta).to(device).requires_grad_(True),
        texts=pairs.texts[torch.from_numpy(chosen)].clone().to(device).requires_grad_(True),
        sim=sim.to(device),
        eta_img=torch.tensor(eta, device=device).requires_grad_(True),
        eta_txt=torch.tensor(eta, device=device).requires_grad_(True),
        eta_param=config.eta_param,
    )


def _optimizer(syn: SyntheticSet, config: DistillConfig) -> torch.optim.SGD:
    groups = [
        {"params": [syn.images], "lr": config.lr_img, "name": "img"},
        {"params": [syn.texts], "lr": config.lr_txt, "name": "txt"},
        {"params": [syn.eta_img, syn.eta_txt], "lr": config.lr_lr, "name": "lr"},
    ]
    if config.learn_sim:
        groups.append({"params": list(syn.sim.parameters()), "lr": config.lr_sim, "name": "sim"})
    return torch.optim.SGD(groups, lr=config.lr_img, momentum=config.momentum)


def _warmup(optimizer: torch.optim.SGD, config: DistillConfig, iteration: int) -> None:
    """Linear warm-up of the X, Y and S learning rates over `config.warmup` iterations."""
    factor = min(1.0, (iteration + 1) / config.warmup) if config.warmup else 1.0
    base = {"img": config.lr_img, "txt": config.lr_txt, "sim": config.lr_sim, "lr": config.lr_lr}
    for group in optimizer.param_groups:
        scale = 1.0 if group["name"] == "lr" else factor
        group["lr"] = base[group["name"]] * scale


def _check_buffers(buffers: Buffers, config: DistillConfig, pairs: PairSet) -> None:
    """Refuse buffers that cannot serve this config and data, before any iteration."""
    if config.max_start_epoch - 1 + config.expert_epochs > buffers.epochs:
        raise UsageError(
            f"--max-start-epoch {config.max_start_epoch} (starts 0..{config.max_start_epoch - 1})"
            f" + --expert-epochs {config.expert_epochs} exceeds the {buffers.epochs} epochs of "
            "the buffers"
        )
    meta = buffers.meta
    for key, message in DATA_PINS:
        ours = getattr(pairs, key)
        if ours not in (None, "") and ours != meta[key]:
            raise UsageError(
                message.format(data=ours, buffers=meta[key], encoder=meta["text_encoder"])
            )


def artifact_config(config: DistillConfig, buffers: Buffers, extra: dict) -> dict[str, Any]:
    """The artifact's `config`: distill settings, student architecture and where data came from."""
    m = buffers.meta
    return {
        **config.to_dict(),
        "method": "lors" if config.learn_sim and config.loss != "ce" else "mtt",
        "image_encoder": m["image_encoder"],
        "text_encoder": m["text_encoder"],
        "image_size": int(m["image_size"]),
        "text_dim": int(m["text_dim"]),
        "embed_dim": int(m["embed_dim"]),
        **{k: m[k] for k in ("image_weights", "text_weights") if k in m},
        "mean": list(m["mean"]),
        "std": list(m["std"]),
        "normalize": m["normalize"],
        "resize": m["resize"],
        "expert_augment": bool(m["augment"]),
        "expert_lr": float(m["lr"]),
        "buffers": str(buffers.directory.resolve()),
        **extra,
    }


def distill(
    pairs: PairSet,
    buffers: Buffers,
    config: DistillConfig,
    *,
    device: torch.device | str = "cpu",
    out: str | os.PathLike | None = None,
    save_every: int = 0,
    resume: bool = False,
    progress: bool = True,
    extra_config: dict | None = None,
) -> dict[str, Any]:
    """Run LoRS (or MTT with learn_sim=False, loss ce); returns the SPEC §8 artifact dict.

    With `out`, a checkpoint is written atomically every `save_every` iterations and the
    artifact at the end; `resume` continues from the checkpoint of an earlier run.
    """
    keep_freed_heap()
    device = torch.device(device)
    _check_buffers(buffers, config, pairs)
    cfg = artifact_config(config, buffers, extra_config or {})
    chosen = pick_init_pairs(pairs, config.pairs, config.seed, config.init)
    uids = [pairs.uids[i] for i in chosen]
    student = build_student(
        cfg["image_encoder"],
        cfg["text_dim"],
        cfg["image_size"],
        config.seed,
        device,
        temperature=config.temperature,
    ).train()
    if student.image_layout.size != buffers.meta["n_img"]:
        raise UsageError(
            f"buffers in {buffers.directory} hold {buffers.meta['n_img']} image parameters, "
            f"the student {cfg['image_encoder']} has {student.image_layout.size}"
        )
    syn = _synthetic_from_real(pairs, chosen, config, buffers.meta, device)
    optimizer = _optimizer(syn, config)
    gen = torch.Generator().manual_seed(derive_seed(config.seed, 2))
    ckpt = checkpoint_path(out) if out is not None else None

    def save(done: int) -> None:
        if ckpt is not None and save_every and done % save_every == 0:
            torch_save_atomic(state(syn, optimizer, gen, done, cfg, uids), ckpt)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(config.seed, 3))
        start = 0
        if resume and ckpt is not None and ckpt.is_file():
            start, uids = restore(ckpt, syn, optimizer, gen, cfg)
        losses, seconds = _loop(
            student, syn, optimizer, gen, buffers, config, start, progress, device, save
        )
        if ckpt is not None:
            torch_save_atomic(state(syn, optimizer, gen, config.iterations, cfg, uids), ckpt)
    artifact = {
        "images": syn.images.detach().cpu().float().clone(),
        "texts": syn.texts.detach().cpu().float().clone(),
        "similarity": syn.sim.export(),
        "lr_img": float(syn.etas()[0].item()),
        "lr_txt": float(syn.etas()[1].item()),
        "config": {
            **cfg,
            "final_loss": float(np.mean(losses[-20:])) if losses else None,
            "seconds": seconds,
        },
        "provenance": {"uids": uids},
    }
    if out is not None:
        torch_save_atomic(artifact, out)
    return artifact


def _loop(
    student: Student,
    syn: SyntheticSet,
    optimizer: torch.optim.SGD,
    gen: torch.Generator,
    buffers: Buffers,
    config: DistillConfig,
    start: int,
    progress: bool,
    device: torch.device,
    on_done: Callable[[int], None],
) -> tuple[list[float], float]:
    """Iterations start..config.iterations of matching + outer SGD; returns the losses."""
    loss_fn = get_loss(config.loss)
    matcher = MATCHERS[config.matching]
    n_experts = len(buffers.experts)
    losses: list[float] = []
    began = time.perf_counter()
    bar = progress_bar(
        range(start, config.iterations),
        initial=start,
        total=config.iterations,
        desc="distill",
        unit="it",
        disable=not progress,
    )
    for it in bar:
        expert = expert_for(config.seed, n_experts, it)
        epoch = start_epoch(config.max_start_epoch, gen)
        parts = buffers.segment(expert, epoch, config.expert_epochs)
        seg = Segment(*(p.to(device=device, dtype=torch.float32) for p in parts))
        batches = mini_batches(config.pairs, config.mini_batch, config.syn_steps, gen)
        optimizer.zero_grad(set_to_none=True)
        with math_attention():
            result = matcher(
                student,
                loss_fn,
                syn,
                seg,
                [b.to(device) for b in batches],
                config.merge_loss_branches,
            )
        if not np.isfinite(result.loss):
            raise MmcurateError(
                f"matching loss became {result.loss} at iteration {it}; lower --lr-img, "
                "--lr-txt or --lr-sim, or add --warmup"
            )
        _warmup(optimizer, config, it)
        optimizer.step()
        _check_step_sizes(syn, config, it)
        losses.append(result.loss)
        eta_img, eta_txt = syn.etas()
        bar.set_postfix(
            loss=f"{np.mean(losses[-20:]):.4f}",
            eta_img=f"{eta_img.item():.3g}",
            eta_txt=f"{eta_txt.item():.3g}",
        )
        if it + 1 < config.iterations:
            on_done(it + 1)
    bar.close()
    return losses, round(time.perf_counter() - began, 3)


def _check_step_sizes(syn: SyntheticSet, config: DistillConfig, it: int) -> None:
    """A learned η at or below 0 turns the inner SGD into ascent: stop with the remedy."""
    for name, eta in zip(("lr_img", "lr_txt"), syn.etas(), strict=True):
        value = float(eta.item())
        if not value > 0:
            remedy = (
                "" if config.eta_param == "log" else ", or learn it in log space (--eta-param log)"
            )
            raise MmcurateError(
                f"learned step size {name} became {value:.4g} at iteration {it}; "
                f"lower --lr-lr (now {config.lr_lr:g}), --lr-sim or --lr-img/--lr-txt, or add "
                f"--warmup{remedy}"
            )


def run_distill(
    data: str,
    buffers_dir: str | os.PathLike,
    out: str | os.PathLike,
    config: DistillConfig,
    *,
    cache_dir: str | os.PathLike,
    image_root: str | None,
    device: str,
    save_every: int,
    resume: bool,
    export_dir: str | os.PathLike | None,
    expect: dict | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`mmcurate distill`: LoRS on DATA against the buffers, written to OUT; the end summary.

    `expect` pins the buffers' image encoder, text encoder, image size, normalisation or resize
    mode; the real pairs are loaded at the buffers' image size, resize mode and text encoder.
    """
    from mmcurate.embed import resolve_device

    if save_every < 0:
        raise UsageError("--save-every must be >= 0")
    dev = resolve_device(device)
    data = absolute_data(str(data))
    buffers = load_buffers(buffers_dir, expect)
    check_tower_weights(buffers.meta, f"buffers in {buffers_dir}")
    real = load_pairs(
        data,
        image_size=int(buffers.meta["image_size"]),
        text_encoder=str(buffers.meta["text_encoder"]),
        cache_dir=cache_dir,
        image_root=image_root,
        device=device,
        resize=str(buffers.meta["resize"]),
    )
    art = distill(
        real,
        buffers,
        config,
        device=dev,
        out=out,
        save_every=save_every,
        resume=resume,
        progress=progress,
        extra_config={"data": data, **({"image_root": image_root} if image_root else {})},
    )
    cfg = art["config"]
    return {
        "pairs": int(art["images"].shape[0]),
        "real_pairs": real.n_pairs,
        "preset": config.preset,
        "iterations": config.iterations,
        "seconds": cfg["seconds"],
        "lr_img": art["lr_img"],
        "lr_txt": art["lr_txt"],
        "final_loss": cfg.get("final_loss"),
        "checkpoint": str(checkpoint_path(out)),
        "export": export_artifact(art, export_dir, real) if export_dir else None,
    }
