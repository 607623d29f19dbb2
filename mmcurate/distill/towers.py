"""Student towers from encoder specs (SPEC §6): the trainable image backbone, the frozen text
tower, and where their weights started, so buffers, distillation and evaluation agree.

Image: convnet-tiny, convnet-wW-dD (from scratch), a timm name (`timm:NAME[@weights]`,
ImageNet-pretrained unless `@random`; `mmc-tiny` is random), or `open_clip:ARCH[/tag][@ckpt]`
(its visual tower, from those weights; `@random` or no weights: from scratch). Text: an
`hf-text:` or `open_clip:` spec whose frozen tower gives the features.
"""

from __future__ import annotations

import copy
import functools
import re

import torch
from torch import Tensor, nn

from mmcurate.embed.encoders import (
    TINY_TIMM,
    is_random_start,
    open_clip_model,
    weights_fingerprint,
)
from mmcurate.embed.spec import parse_spec
from mmcurate.errors import UsageError

_CONVNET = re.compile(r"^convnet-w(\d+)-d(\d+)$")
TEXT_KINDS = ("hf-text", "open_clip")
RANDOM = "random"


class ConvNet(nn.Module):
    """The MTT ConvNet: depth x [conv3x3, instance norm, ReLU, avg-pool 2], flatten, linear."""

    def __init__(self, width: int, depth: int, image_size: int, out_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = 3, image_size
        for _ in range(depth):
            layers += [
                nn.Conv2d(channels, width, 3, padding=1),
                nn.GroupNorm(width, width, affine=True),
                nn.ReLU(),
                nn.AvgPool2d(2),
            ]
            channels, size = width, size // 2
        if size < 1:
            raise UsageError(f"image size {image_size} is too small for a ConvNet of depth {depth}")
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width * size * size, out_dim)
        self.num_features = out_dim

    def forward(self, x: Tensor) -> Tensor:
        """Pooled image features (n, out_dim)."""
        return self.fc(self.features(x).flatten(1))


def canonical_image_encoder(name: str) -> str:
    """The image encoder name as stored in buffers: a `timm:` prefix is dropped."""
    return name.removeprefix("timm:")


def image_is_random(name: str) -> bool:
    """True when the image tower starts from random weights (seeded by the student's seed)."""
    name = canonical_image_encoder(name)
    if name == "convnet-tiny" or _CONVNET.match(name):
        return True
    if name.startswith("open_clip:"):
        s = parse_spec(name)
        return s.checkpoint == RANDOM or (s.checkpoint is None and s.pretrained is None)
    base, _, weights = name.partition("@")
    return weights == RANDOM or base == "mmc-tiny"


def _timm_backbone(name: str) -> nn.Module:
    """A timm model without classifier; `name@path` loads local weights, `name@random` none."""
    import timm

    base, _, weights = name.partition("@")
    tiny = base == "mmc-tiny"
    arch = TINY_TIMM if tiny else base
    if not timm.is_model(arch):
        raise UsageError(
            f"unknown image encoder {name!r}: not convnet-tiny, convnet-wW-dD, timm or open_clip"
        )
    if tiny or weights == RANDOM:
        return timm.create_model(arch, pretrained=False, num_classes=0)
    if weights:
        try:
            return timm.create_model(
                arch, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": weights}
            )
        except Exception as exc:
            raise UsageError(f"cannot load weights {weights} for timm:{arch}: {exc}") from None
    try:
        return timm.create_model(arch, pretrained=True, num_classes=0)
    except Exception:
        raise UsageError(
            f"ImageNet weights for timm:{arch} could not be fetched; "
            f"use --image-encoder {arch}@/local/weights.pth (or {arch}@random)"
        ) from None


def _visual(name: str) -> nn.Module:
    """The visual tower of an open_clip spec (global RNG: the caller seeds random starts)."""
    model, _ = open_clip_model(parse_spec(name), name, seeded=False)
    visual = model.visual
    visual.num_features = int(visual.output_dim)
    return visual


@functools.lru_cache(maxsize=2)
def _pretrained_visual(name: str) -> nn.Module:
    """Loaded once per process without drawing from the caller's RNG (the weights replace the
    random start), so a student's seeded start never depends on what the process built before."""
    with torch.random.fork_rng(devices=[]):
        return _visual(name)


def _open_clip_backbone(name: str, image_size: int) -> nn.Module:
    """A fresh copy of an open_clip visual tower, from its weights or (random) from scratch."""
    visual = _visual(name) if image_is_random(name) else copy.deepcopy(_pretrained_visual(name))
    size = visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    if int(size) != int(image_size):
        raise UsageError(f"{name} takes {size} px images; the image size is {image_size}")
    return visual


def image_backbone(name: str, image_size: int) -> nn.Module:
    """The image encoder NAME names (see the module docstring), with `num_features`."""
    name = canonical_image_encoder(name)
    if name == "convnet-tiny":
        return ConvNet(32, 3, image_size, 64)
    match = _CONVNET.match(name)
    if match:
        width, depth = int(match.group(1)), int(match.group(2))
        return ConvNet(width, depth, image_size, width)
    if name.startswith("open_clip:"):
        return _open_clip_backbone(name, image_size)
    return _timm_backbone(name)


def load_text_encoder(spec: str, device: str = "cpu"):
    """The frozen text tower of the students (an `hf-text:` or `open_clip:` spec)."""
    from mmcurate.embed import load_encoder

    if parse_spec(spec).kind not in TEXT_KINDS:
        raise UsageError(f"--text-encoder must be an hf-text: or open_clip: spec, got {spec!r}")
    encoder = load_encoder(spec, device)
    if not encoder.has_text:
        raise UsageError(f"text encoder {spec!r} has no text tower")
    return encoder


def text_is_random(spec: str) -> bool:
    """True when the text tower's weights are random (`@random`, or a tiny config bare)."""
    s = parse_spec(spec)
    if s.kind == "open_clip":
        return s.checkpoint == RANDOM or (s.checkpoint is None and s.pretrained is None)
    return is_random_start(s)


def tower_weights(image_encoder: str, text_encoder: str, image_size: int) -> dict:
    """Where each tower starts: a fingerprint of its weights, or 'random' for a seeded start."""
    image = RANDOM
    if not image_is_random(image_encoder):
        image = weights_fingerprint(image_backbone(image_encoder, image_size))
    text = RANDOM if text_is_random(text_encoder) else load_text_encoder(text_encoder).fingerprint
    return {"image_weights": image, "text_weights": text}


def check_expected_towers(meta: dict, expect: dict, where: str) -> None:
    """Refuse towers other than the buffers' in one line: image spec; text width, a random text
    tower for pretrained buffers, or another text spec."""
    image = expect.get("image_encoder")
    if image and canonical_image_encoder(image) != meta.get("image_encoder"):
        raise UsageError(
            f"buffers in {where} were made for image encoder {meta.get('image_encoder')!r}, not "
            f"{canonical_image_encoder(image)!r}; use theirs or make new buffers"
        )
    for key in ("image_weights", "text_weights"):
        if expect.get(key) and meta.get(key) and expect[key] != meta[key]:
            raise UsageError(
                f"buffers in {where} were made from other {key.replace('_', ' ')} "
                f"({meta[key]}, not {expect[key]}); use the buffers the set was distilled with"
            )
    text = expect.get("text_encoder")
    if not text or text == meta.get("text_encoder"):
        return
    dim = int(load_text_encoder(text).dim)
    if "text_dim" in meta and dim != int(meta["text_dim"]):
        raise UsageError(
            f"text tower {text!r} gives {dim}-d features; the buffers in {where} hold "
            f"{meta['text_dim']}-d text features ({meta.get('text_encoder')!r})"
        )
    if text_is_random(text) and meta.get("text_weights", RANDOM) != RANDOM:
        raise UsageError(
            f"text tower {text!r} starts from random weights; the buffers in {where} were made "
            f"with the pretrained {meta.get('text_encoder')!r}"
        )
    raise UsageError(
        f"buffers in {where} were made for text encoder {meta.get('text_encoder')!r}, not "
        f"{text!r}; use theirs or make new buffers"
    )


def check_tower_weights(meta: dict, where: str) -> None:
    """Refuse when a tower's weights changed since the buffers (or artifact) recorded them."""
    if "image_weights" not in meta or "text_weights" not in meta:
        return
    now = tower_weights(meta["image_encoder"], meta["text_encoder"], int(meta["image_size"]))
    for key, spec in (("image_weights", "image_encoder"), ("text_weights", "text_encoder")):
        if now[key] != meta[key]:
            raise UsageError(
                f"{where} was made with other weights of {meta[spec]!r} (fingerprint "
                f"{meta[key]}, now {now[key]}); the checkpoint changed: make new buffers"
            )


def math_attention():
    """A context in which scaled-dot-product attention takes its math kernel, which has a
    double-backward (the fused CPU kernels have none, and trajectory matching differentiates
    the student's gradient)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)
