"""The distillation checkpoint (`<name>.ckpt.pt`): what a resumed run needs to continue exactly."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mmcurate.distill.matching import SyntheticSet
from mmcurate.errors import UsageError

RESUMABLE_IGNORE = ("iterations",)


def checkpoint_path(out: str | os.PathLike) -> Path:
    """The checkpoint written beside the artifact: `<name>.ckpt.pt`."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".pt") + ".ckpt.pt")


def state(syn: SyntheticSet, optimizer, gen, iteration: int, cfg: dict, uids: list) -> dict:
    """Everything learned so far, the optimiser, the generators and the config."""
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


def restore(path: Path, syn: SyntheticSet, optimizer, gen, cfg: dict) -> tuple[int, list]:
    """Load a checkpoint made with the same config into the run; (iteration, init uids)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot resume from corrupt checkpoint {path}: {exc}") from None
    old = {k: v for k, v in saved["config"].items() if k not in RESUMABLE_IGNORE}
    new = {k: v for k, v in cfg.items() if k not in RESUMABLE_IGNORE}
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        k = diff[0]
        raise UsageError(
            f"checkpoint {path} was made with {k}={old.get(k)!r}, not {new.get(k)!r}; "
            "drop --resume to start over"
        )
    with torch.no_grad():
        syn.images.copy_(saved["images"])
        syn.texts.copy_(saved["texts"])
        syn.sim.load_state_dict(saved["sim"])
        syn.eta_img.copy_(saved["eta_img"])
        syn.eta_txt.copy_(saved["eta_txt"])
    optimizer.load_state_dict(saved["optimizer"])
    gen.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    return int(saved["iteration"]), list(saved["uids"])
