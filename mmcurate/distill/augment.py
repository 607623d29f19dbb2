"""The experts' image protocol (SPEC §6): normalisation constants, resize modes and the training
augmentation of the LoRS reference.

The reference trains experts on RandomResizedCrop(scale 0.5-1, bicubic), a horizontal flip and
BLIP's RandomAugment(2 ops, magnitude 5) over ten operations, then CLIP's mean/std. Here the
augmentation runs on the cached square uint8 images (the reference crops the original file), on
whatever device the batch is on, with every random draw from one `torch.Generator`, so an
expert's images depend only on its seed. Geometric operations follow OpenCV's `warpAffine`
conventions of the reference (pixel centres at integers, bilinear, grey fill 128).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmcurate.errors import UsageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = {"clip": (CLIP_MEAN, CLIP_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}
RESIZE_MODES = ("squash", "crop")
RANDAUG_OPS = (
    "Identity",
    "AutoContrast",
    "Brightness",
    "Sharpness",
    "Equalize",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
MAX_LEVEL = 10
FILL = 128


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a named normalisation: clip or imagenet."""
    try:
        return NORMALIZATIONS[name]
    except KeyError:
        raise UsageError(
            f"unknown normalisation {name!r}: choose from {', '.join(NORMALIZATIONS)}"
        ) from None


def check_resize(mode: str) -> str:
    """A valid resize mode: squash (the reference's Resize((s, s))) or crop (shorter side)."""
    if mode not in RESIZE_MODES:
        raise UsageError(f"unknown resize mode {mode!r}: choose from {', '.join(RESIZE_MODES)}")
    return mode


@dataclass(frozen=True)
class ExpertAugment:
    """RandomResizedCrop -> horizontal flip -> RandomAugment(n_ops, magnitude), on uint8 images."""

    size: int
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    n_ops: int = 2
    magnitude: int = 5
    op_prob: float = 0.5

    def steps(self) -> list[str]:
        """The transform sequence, as recorded in the buffers' metadata."""
        return [
            f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio=(3/4, 4/3), bicubic)",
            f"RandomHorizontalFlip(p={self.flip})",
            f"RandomAugment(n={self.n_ops}, m={self.magnitude}, p={self.op_prob}, "
            f"ops={list(RANDAUG_OPS)})",
        ]

    def __call__(self, pixels: Tensor, gen: torch.Generator) -> Tensor:
        """uint8 (k,H,W,3) -> uint8 (k,size,size,3), each image with its own random draws."""
        out = [self.one(img.permute(2, 0, 1), gen) for img in pixels]
        if not out:
            return pixels.new_zeros((0, self.size, self.size, 3))
        return torch.stack(out).permute(0, 2, 3, 1).contiguous()

    def one(self, img: Tensor, gen: torch.Generator) -> Tensor:
        """One uint8 (3,H,W) image through the whole sequence."""
        import torchvision.transforms.v2.functional as TF

        top, left, h, w = crop_box(img.shape[1], img.shape[2], self.scale, self.ratio, gen)
        img = TF.resized_crop(
            img, top, left, h, w, [self.size, self.size], TF.InterpolationMode.BICUBIC, True
        )
        if _uniform(gen) < self.flip:
            img = TF.horizontal_flip(img)
        for _ in range(self.n_ops):
            name = RANDAUG_OPS[int(torch.randint(len(RANDAUG_OPS), (1,), generator=gen))]
            if _uniform(gen) > self.op_prob:
                continue
            img = apply_op(img, name, self.magnitude, gen)
        return img


def _uniform(gen: torch.Generator) -> float:
    return float(torch.rand((), generator=gen))


def crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], gen
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w): area share in `scale`, log-uniform aspect."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * _uniform(gen))
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * _uniform(gen))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(height - h + 1, (1,), generator=gen))
            left = int(torch.randint(width - w + 1, (1,), generator=gen))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _signed(value: float, gen: torch.Generator) -> float:
    return -value if _uniform(gen) < 0.5 else value


def apply_op(img: Tensor, name: str, magnitude: int, gen: torch.Generator) -> Tensor:
    """One RandomAugment operation at `magnitude` (of 10) on a uint8 (3,H,W) image."""
    import torchvision.transforms.v2.functional as TF

    level = magnitude / MAX_LEVEL
    if name == "Identity":
        return img
    if name == "AutoContrast":
        return TF.autocontrast(img)
    if name == "Equalize":
        return TF.equalize(img)
    if name in ("Brightness", "Sharpness"):
        factor = level * 1.8 + 0.1
        if factor == 1.0:  # magnitude 5 of the reference: both are the identity
            return img
        if name == "Brightness":
            return TF.adjust_brightness(img, factor)
        return TF.adjust_sharpness(img, factor)
    h, w = img.shape[1], img.shape[2]
    if name == "ShearX":
        matrix = [[1.0, _signed(level * 0.3, gen), 0.0], [0.0, 1.0, 0.0]]
    elif name == "ShearY":
        matrix = [[1.0, 0.0, 0.0], [_signed(level * 0.3, gen), 1.0, 0.0]]
    elif name == "TranslateX":
        matrix = [[1.0, 0.0, -_signed(level * 10, gen)], [0.0, 1.0, 0.0]]
    elif name == "TranslateY":
        matrix = [[1.0, 0.0, 0.0], [0.0, 1.0, -_signed(level * 10, gen)]]
    elif name == "Rotate":
        matrix = rotation_matrix(_signed(level * 30, gen), w / 2, h / 2)
    else:
        raise ValueError(f"unknown augmentation {name!r}")
    return warp_affine(img, torch.tensor(matrix, dtype=torch.float64))


def rotation_matrix(degrees: float, cx: float, cy: float) -> list[list[float]]:
    """OpenCV's getRotationMatrix2D(centre, degrees, 1): counter-clockwise on screen."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return [[c, s, (1 - c) * cx - s * cy], [-s, c, s * cx + (1 - c) * cy]]


def warp_affine(img: Tensor, matrix: Tensor, fill: int = FILL) -> Tensor:
    """dst(M·p) = src(p) for a forward 2×3 matrix M, bilinear, constant fill (cv2.warpAffine)."""
    _, h, w = img.shape
    (a, b, c), (d, e, f) = matrix.tolist()
    det = a * e - b * d
    # the inverse map dst -> src, then pixel (x, y) <-> normalised 2x/(w-1) - 1, 2y/(h-1) - 1
    inv = ((e / det, -b / det, (b * f - c * e) / det), (-d / det, a / det, (c * d - a * f) / det))
    sx, sy = max(w - 1, 1) / 2, max(h - 1, 1) / 2
    theta = [
        [inv[0][0], inv[0][1] * sy / sx, (inv[0][0] * sx + inv[0][1] * sy + inv[0][2]) / sx - 1],
        [inv[1][0] * sx / sy, inv[1][1], (inv[1][0] * sx + inv[1][1] * sy + inv[1][2]) / sy - 1],
    ]
    grid = F.affine_grid(torch.tensor([theta]), [1, 4, h, w], align_corners=True).to(img.device)
    x = torch.cat([img.float(), torch.ones_like(img[:1], dtype=torch.float32)])[None]
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    warped, mask = out[0, :3], out[0, 3:]
    return (warped + (1 - mask) * fill).round().clamp(0, 255).to(torch.uint8)


def protocol_meta(augment: bool, normalize: str, resize: str, size: int) -> dict[str, Any]:
    """The image protocol recorded in the buffers: augmentation, mean/std, resize, drop_last."""
    mean, std = normalization(normalize)
    steps = ExpertAugment(size).steps() if augment else []
    return {
        "augment": bool(augment),
        "normalize": normalize,
        "mean": list(mean),
        "std": list(std),
        "resize": check_resize(resize),
        "transforms": [*steps, "ToTensor", f"Normalize({normalize})"],
        "drop_last": True,
    }
