"""Distillation settings: the published LoRS presets, the `tiny` preset, and overrides."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from mmcurate.errors import UsageError


@dataclass(frozen=True)
class DistillConfig:
    """Every knob of `mmcurate distill`; a preset fills them, flags override them."""

    preset: str = "flickr-100"
    pairs: int = 99
    iterations: int = 3000
    syn_steps: int = 8
    expert_epochs: int = 1
    max_start_epoch: int = 2
    mini_batch: int = 20
    lr_img: float = 100.0
    lr_txt: float = 100.0
    lr_sim: float = 10.0
    lr_lr: float = 0.01
    rank: int | str = 10
    alpha: float = 3.0
    loss: str = "wbce"
    matching: str = "tesla"
    merge_loss_branches: bool = False
    temperature: float = 0.07
    init: str = "random"
    augment: bool = True
    warmup: int = 0
    eta_init: float = 0.1
    eta_param: str = "linear"
    momentum: float = 0.5
    learn_sim: bool = True
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-types form, stored in checkpoints and artifacts."""
        return asdict(self)


def _row(pairs, lr, lr_sim, rank, alpha, mini_batch, *, lr_txt=None, **departures) -> dict:
    """A preset: the six values every reference script sets, and where it departs from the
    scripts' common settings, which are DistillConfig's defaults."""
    return {
        "pairs": pairs,
        "lr_img": float(lr),
        "lr_txt": float(lr if lr_txt is None else lr_txt),
        "lr_sim": float(lr_sim),
        "rank": rank,
        "alpha": float(alpha),
        "mini_batch": mini_batch,
        **departures,
    }


_TINY = {
    "iterations": 100,
    "expert_epochs": 2,
    "augment": False,
    "init": "distinct",
    "eta_param": "log",
}
_COCO = {"merge_loss_branches": True}  # every COCO script passes --merge_loss_branches
# The published rows are the reference's sh/distill_{flickr,coco}_lors_{100,200,500}.sh.
PRESETS: dict[str, dict[str, Any]] = {
    "flickr-100": _row(99, 100, 10, 10, 3, 20),
    "flickr-200": _row(199, 1000, 10, 5, 1, 20),
    "flickr-500": _row(499, 1000, 100, 20, 0.01, 40, max_start_epoch=3),
    "coco-100": _row(99, 1000, 5, 10, 1, 20, **_COCO),
    "coco-200": _row(199, 1000, 50, 20, 1, 20, **_COCO, iterations=2000),
    "coco-500": _row(499, 5000, 500, 40, 1, 30, **_COCO, temperature=0.1, augment=False),
    # mmcurate's own, for the tiny built-in students (the demo's pretrained towers): η in log
    # space (the published linear η goes negative within the first iterations there), distinct,
    # clean initial images, a two-epoch target and 100 iterations (bench_lors_margin.py).
    "tiny": _row(20, 100, 0.3, 4, 1, 10, warmup=50, lr_txt=30, lr_lr=3e-3, **_TINY),
}
MATCHING = ("tesla", "full")


def parse_rank(value: int | str) -> int | str:
    """A similarity rank: a positive integer, or 'full' for the full-matrix variant."""
    if isinstance(value, str) and value.strip().lower() == "full":
        return "full"
    try:
        rank = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"--rank must be a positive integer or 'full', got {value!r}") from None
    if rank < 1:
        raise UsageError(f"--rank must be a positive integer or 'full', got {value!r}")
    return rank


def resolve_config(preset: str, **overrides: Any) -> DistillConfig:
    """The preset's settings with every non-None override applied, validated."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    known = {f.name for f in fields(DistillConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UsageError(f"unknown distill setting(s): {', '.join(unknown)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    config = replace(DistillConfig(preset=preset), **values)
    return validate(replace(config, rank=parse_rank(config.rank)))


def validate(config: DistillConfig) -> DistillConfig:
    """Refuse settings that cannot run, with one line naming the setting."""
    from mmcurate.distill.losses import LOSSES
    from mmcurate.distill.matching import ETA_PARAMS
    from mmcurate.distill.sampling import INITS

    positive = ("pairs", "syn_steps", "expert_epochs", "mini_batch", "max_start_epoch")
    for name in positive:
        if getattr(config, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if config.iterations < 0 or config.warmup < 0:
        raise UsageError("--iterations and --warmup must be >= 0")
    if config.loss not in LOSSES:
        raise UsageError(f"unknown loss {config.loss!r}: choose from {', '.join(LOSSES)}")
    if config.matching not in MATCHING:
        raise UsageError(f"unknown matching {config.matching!r}: choose from tesla, full")
    if config.init not in INITS:
        raise UsageError(f"unknown --init {config.init!r}: choose from {', '.join(INITS)}")
    if config.eta_param not in ETA_PARAMS:
        raise UsageError(
            f"unknown --eta-param {config.eta_param!r}: choose from {', '.join(ETA_PARAMS)}"
        )
    for name in ("temperature", "eta_init"):
        if not getattr(config, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0")
    return config


def config_from_dict(data: dict[str, Any]) -> DistillConfig:
    """Rebuild a config stored in a checkpoint or artifact (extra keys are ignored)."""
    known = {f.name for f in fields(DistillConfig)}
    return DistillConfig(**{k: v for k, v in data.items() if k in known})


def mtt_config(config: DistillConfig) -> DistillConfig:
    """The MTT-VL baseline of a LoRS config: S fixed to I and symmetric cross-entropy."""
    return replace(config, learn_sim=False, loss="ce", lr_sim=0.0)
