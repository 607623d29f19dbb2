"""The LoRS outer loop: learn X, Y, S and η by trajectory matching against expert buffers."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcurate.data.atomic import torch_save_atomic
from mmcurate.distill.buffers import Buffers, derive_seed, load_buffers
from mmcurate.distill.data import PairSet, load_pairs
from mmcurate.distill.export import export_artifact
from mmcurate.distill.losses import get_loss
from mmcurate.distill.matching import MATCHERS, Segment, SyntheticSet
from mmcurate.distill.presets import DistillConfig
from mmcurate.distill.similarity import make_similarity
from mmcurate.distill.sources import absolute_data
from mmcurate.distill.students import Student, build_student, normalize_images
from mmcurate.errors import MmcurateError, UsageError
from mmcurate.progress import progress_bar

RESUMABLE_IGNORE = ("iterations",)
SAVE_EVERY = 100


def checkpoint_path(out: str | os.PathLike) -> Path:
    """The checkpoint written beside the artifact: `<name>.ckpt.pt`."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".pt") + ".ckpt.pt")


def pick_init_pairs(pairs: PairSet, n: int, seed: int) -> np.ndarray:
    """N random real pairs with distinct images (one random caption of each)."""
    if pairs.n_images < n:
        raise UsageError(
            f"the real data has {pairs.n_images} images ({pairs.n_pairs} pairs), "
            f"fewer than N = {n} distilled pairs"
        )
    rng = np.random.default_rng(derive_seed(seed, 0))
    images = rng.permutation(pairs.n_images)[:n]
    by_image: dict[int, list[int]] = {}
    for pair, image in enumerate(pairs.image_index):
        by_image.setdefault(int(image), []).append(pair)
    return np.array([by_image[int(i)][rng.integers(len(by_image[int(i)]))] for i in images])


def _synthetic_from_real(
    pairs: PairSet, chosen: np.ndarray, config: DistillConfig, meta: dict, device: torch.device
) -> SyntheticSet:
    """X and Y from N real pairs (normalised as the experts saw them), S = I, η = eta_init."""
    gen = torch.Generator().manual_seed(derive_seed(config.seed, 1))
    sim = make_similarity(config.pairs, config.rank, config.alpha, gen)
    sim.requires_grad_(config.learn_sim)
    return SyntheticSet(
        images=normalize_images(pairs.pixels(chosen), meta["mean"], meta["std"])
        .to(device)
        .requires_grad_(True),
        texts=pairs.texts[torch.from_numpy(chosen)].clone().to(device).requires_grad_(True),
        sim=sim.to(device),
        eta_img=torch.tensor(config.eta_init, device=device).requires_grad_(True),
        eta_txt=torch.tensor(config.eta_init, device=device).requires_grad_(True),
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


def _batches(n: int, config: DistillConfig, gen: torch.Generator) -> list[torch.Tensor]:
    """syn_steps mini-batches drawn from successive random permutations of the N pairs (MTT)."""
    chunks: list[torch.Tensor] = []
    out = []
    for _ in range(config.syn_steps):
        if not chunks:
            chunks = list(torch.split(torch.randperm(n, generator=gen), config.mini_batch))
        out.append(chunks.pop())
    return out


def _check_buffers(buffers: Buffers, config: DistillConfig, pairs: PairSet) -> None:
    """Refuse buffers that cannot serve this config and data, before any iteration."""
    if config.max_start_epoch + config.expert_epochs > buffers.epochs:
        raise UsageError(
            f"--max-start-epoch {config.max_start_epoch} + --expert-epochs "
            f"{config.expert_epochs} exceeds the {buffers.epochs} epochs of the buffers"
        )
    if pairs.text_encoder and pairs.text_encoder != buffers.meta["text_encoder"]:
        raise UsageError(
            f"the data's texts were encoded with {pairs.text_encoder!r}, the buffers' with "
            f"{buffers.meta['text_encoder']!r}"
        )
    if pairs.text_dim != buffers.meta["text_dim"]:
        raise UsageError(
            f"the data's text features have dimension {pairs.text_dim}, the buffers' "
            f"{buffers.meta['text_dim']}: use the buffers' text encoder "
            f"{buffers.meta['text_encoder']}"
        )
    if pairs.image_size != buffers.meta["image_size"]:
        raise UsageError(
            f"the data's images are {pairs.image_size} px, the buffers' "
            f"{buffers.meta['image_size']} px"
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
        "mean": list(m["mean"]),
        "std": list(m["std"]),
        "expert_lr": float(m["lr"]),
        "buffers": str(buffers.directory.resolve()),
        **extra,
    }


def _state(syn: SyntheticSet, optimizer, gen, iteration: int, cfg: dict, uids: list) -> dict:
    return {
        "iteration": iteration,
        "images": syn.images.detach().cpu(),
        "texts": syn.texts.detach().cpu(),
        "sim": {k: v.detach().cpu() for k, v in syn.sim.state_dict().items()},
        "eta_img": syn.eta_img.detach().cpu(),
        "eta_txt": syn.eta_txt.detach().cpu(),
        "optimizer": optimizer.state_dict(),
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "config": cfg,
        "uids": uids,
    }


def _restore(path: Path, syn: SyntheticSet, optimizer, gen, cfg: dict) -> tuple[int, list]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot resume from corrupt checkpoint {path}: {exc}") from None
    old = {k: v for k, v in state["config"].items() if k not in RESUMABLE_IGNORE}
    new = {k: v for k, v in cfg.items() if k not in RESUMABLE_IGNORE}
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        k = diff[0]
        raise UsageError(
            f"checkpoint {path} was made with {k}={old.get(k)!r}, not {new.get(k)!r}; "
            "drop --resume to start over"
        )
    with torch.no_grad():
        syn.images.copy_(state["images"])
        syn.texts.copy_(state["texts"])
        syn.sim.load_state_dict(state["sim"])
        syn.eta_img.copy_(state["eta_img"])
        syn.eta_txt.copy_(state["eta_txt"])
    optimizer.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["iteration"]), list(state["uids"])


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
    device = torch.device(device)
    _check_buffers(buffers, config, pairs)
    cfg = artifact_config(config, buffers, extra_config or {})
    chosen = pick_init_pairs(pairs, config.pairs, config.seed)
    uids = [pairs.uids[i] for i in chosen]
    student = build_student(
        cfg["image_encoder"], cfg["text_dim"], cfg["image_size"], config.seed, device
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
            torch_save_atomic(_state(syn, optimizer, gen, done, cfg, uids), ckpt)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(config.seed, 3))
        start = 0
        if resume and ckpt is not None and ckpt.is_file():
            start, uids = _restore(ckpt, syn, optimizer, gen, cfg)
        losses, seconds = _loop(
            student, syn, optimizer, gen, buffers, config, start, progress, device, save
        )
        if ckpt is not None:
            torch_save_atomic(_state(syn, optimizer, gen, config.iterations, cfg, uids), ckpt)
    artifact = {
        "images": syn.images.detach().cpu().float().clone(),
        "texts": syn.texts.detach().cpu().float().clone(),
        "similarity": syn.sim.export(),
        "lr_img": float(syn.eta_img.item()),
        "lr_txt": float(syn.eta_txt.item()),
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
        expert = int(torch.randint(n_experts, (1,), generator=gen))
        epoch = int(torch.randint(config.max_start_epoch + 1, (1,), generator=gen))
        parts = buffers.segment(expert, epoch, config.expert_epochs)
        seg = Segment(*(p.to(device=device, dtype=torch.float32) for p in parts))
        batches = [b.to(device) for b in _batches(config.pairs, config, gen)]
        optimizer.zero_grad(set_to_none=True)
        result = matcher(student, loss_fn, syn, seg, batches)
        if not np.isfinite(result.loss):
            raise MmcurateError(
                f"matching loss became {result.loss} at iteration {it}; lower --lr-img, "
                "--lr-txt or --lr-sim, or add --warmup"
            )
        _warmup(optimizer, config, it)
        optimizer.step()
        _check_step_sizes(syn, config, it)
        losses.append(result.loss)
        bar.set_postfix(
            loss=f"{np.mean(losses[-20:]):.4f}",
            eta_img=f"{syn.eta_img.item():.3g}",
            eta_txt=f"{syn.eta_txt.item():.3g}",
        )
        if it + 1 < config.iterations:
            on_done(it + 1)
    bar.close()
    return losses, round(time.perf_counter() - began, 3)


def _check_step_sizes(syn: SyntheticSet, config: DistillConfig, it: int) -> None:
    """A learned η at or below 0 turns the inner SGD into ascent: stop with the remedy."""
    for name, eta in (("lr_img", syn.eta_img), ("lr_txt", syn.eta_txt)):
        value = float(eta.item())
        if not value > 0:
            raise MmcurateError(
                f"learned step size {name} became {value:.4g} at iteration {it}; "
                f"lower --lr-lr (now {config.lr_lr:g}) or add --warmup"
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

    `expect` pins the buffers' image encoder, text encoder or image size; the real pairs are
    loaded at the buffers' image size and text encoder.
    """
    from mmcurate.embed import resolve_device

    if save_every < 0:
        raise UsageError("--save-every must be >= 0")
    dev = resolve_device(device)
    data = absolute_data(str(data))
    buffers = load_buffers(buffers_dir, expect)
    real = load_pairs(
        data,
        image_size=int(buffers.meta["image_size"]),
        text_encoder=str(buffers.meta["text_encoder"]),
        cache_dir=cache_dir,
        image_root=image_root,
        device=device,
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
