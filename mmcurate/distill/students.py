"""Student networks of SPEC §6: an image backbone plus a projection head on frozen text features.

Parameters live in two flat vectors (image, text) and the forward pass goes through
`torch.func.functional_call`, so trajectory matching can run a student at any point θ_t.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from mmcurate.distill.towers import image_backbone
from mmcurate.errors import UsageError

TEMPERATURE = 0.07


class ProjectionHead(nn.Module):
    """Trainable head on frozen CLS features: LayerNorm(Dropout(W2 GELU(W1 x)) + W1 x)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Projected text features (n, out_dim)."""
        p = self.projection(x)
        return self.layer_norm(self.dropout(self.fc(F.gelu(p))) + p)


@dataclass(frozen=True)
class FlatLayout:
    """Names, shapes and sizes of a module's parameters in flat-vector order."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    numels: tuple[int, ...]

    @classmethod
    def of(cls, module: nn.Module) -> FlatLayout:
        """The layout of a module's trainable parameters."""
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        return cls(
            tuple(n for n, _ in named),
            tuple(p.shape for _, p in named),
            tuple(p.numel() for _, p in named),
        )

    @property
    def size(self) -> int:
        """Total number of parameters."""
        return sum(self.numels)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of `flat` keyed by parameter name, for functional_call."""
        parts = torch.split(flat, list(self.numels))
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}


def flatten_params(module: nn.Module) -> Tensor:
    """A detached copy of a module's trainable parameters as one vector."""
    params = [p.detach().reshape(-1) for p in module.parameters() if p.requires_grad]
    return torch.cat(params).clone()


class Student(nn.Module):
    """Image backbone + text projection head, logits at a fixed temperature (default 0.07)."""

    def __init__(
        self,
        image_encoder: str,
        text_dim: int,
        image_size: int,
        dropout: float = 0.1,
        temperature: float = TEMPERATURE,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise UsageError(f"the student temperature must be > 0, got {temperature}")
        self.image_encoder = image_encoder
        self.image_size = image_size
        self.temperature = float(temperature)
        self.image = image_backbone(image_encoder, image_size)
        self.embed_dim = int(self.image.num_features)
        self.text_dim = int(text_dim)
        self.text = ProjectionHead(text_dim, self.embed_dim, dropout)
        self.image_layout = FlatLayout.of(self.image)
        self.text_layout = FlatLayout.of(self.text)

    def flat(self) -> tuple[Tensor, Tensor]:
        """Detached copies of the current image and text parameters."""
        return flatten_params(self.image), flatten_params(self.text)

    def features(
        self, p_img: Tensor, p_txt: Tensor, images: Tensor, texts: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Image and text features of the student at the flat parameters (p_img, p_txt)."""
        f = functional_call(self.image, self.image_layout.unflatten(p_img), (images,))
        g = functional_call(self.text, self.text_layout.unflatten(p_txt), (texts,))
        return f, g

    def logits(self, p_img: Tensor, p_txt: Tensor, images: Tensor, texts: Tensor) -> Tensor:
        """exp(logit_scale) * f̂ ĝᵀ at the flat parameters."""
        f, g = self.features(p_img, p_txt, images, texts)
        return scaled_logits(f, g, self.temperature)

    def forward(self, images: Tensor, texts: Tensor) -> Tensor:
        """Logits with the module's own parameters (for ordinary training)."""
        return scaled_logits(self.image(images), self.text(texts), self.temperature)


def scaled_logits(f: Tensor, g: Tensor, temperature: float = TEMPERATURE) -> Tensor:
    """Cosine similarities scaled by exp(log(1/temperature)), as the reference's logit_scale."""
    scale = math.exp(math.log(1.0 / temperature))
    return scale * F.normalize(f, dim=-1) @ F.normalize(g, dim=-1).T


def build_student(
    image_encoder: str,
    text_dim: int,
    image_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    dropout: float = 0.1,
    temperature: float = TEMPERATURE,
) -> Student:
    """A student whose random initialisation depends only on `seed` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = Student(image_encoder, text_dim, image_size, dropout, temperature)
    return student.to(device=device, dtype=dtype)


def normalize_images(pixels: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (n,H,W,3) -> float32 (n,3,H,W) normalised by mean/std."""
    x = pixels.permute(0, 3, 1, 2).float() / 255.0
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def denormalize_images(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """float (n,3,H,W) normalised -> float (n,3,H,W) in [0, 1]."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * s + m).clamp(0, 1)
