"""The demo's pretrained student towers: each trained alone, on its own modality, on the
teacher's clean split, as the reference's students start from NFNet (ImageNet) and BERT (text).

- Image: the `mmc-tiny` visual tower learns supervised classification of what each image
  shows (shape, colour, size, position, background: five linear heads on its output).
- Text: the `mmc-tiny` text tower learns to classify the attribute words a caption names
  (shape, colour, size, position: four linear heads); captions naming none are left out.

The two never see a pair, so neither hands the students the cross-modal alignment the
distilled pairs must teach. Each is saved as an open_clip `mmc-tiny` state dict (the unused
tower stays at its random start), loaded by the students as `open_clip:mmc-tiny@PATH`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmcurate.data.atomic import torch_save_atomic
from mmcurate.demo.corpus import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Concept
from mmcurate.demo.teacher import build_model, encode_text_prefix, pixels_to_input, teacher_spec

IMAGE_LABELS = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUNDS,
}
TEXT_LABELS = {k: IMAGE_LABELS[k] for k in ("shape", "colour", "size", "position")}


@dataclass(frozen=True)
class PretrainConfig:
    """Supervised training of one tower (AdamW, warm-up then cosine)."""

    steps: int = 200
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 20
    seed: int = 0


def image_labels(concepts: Sequence[Concept]) -> torch.Tensor:
    """(n, 5) class indices of each image's shape, colour, size, position and background."""
    return torch.tensor(
        [[names.index(getattr(c, key)) for key, names in IMAGE_LABELS.items()] for c in concepts]
    )


def caption_labels(captions: Sequence[str]) -> tuple[np.ndarray, torch.Tensor]:
    """The captions that name every text attribute, and (k, 4) indices of the words named."""
    keep, labels = [], []
    for i, caption in enumerate(captions):
        words = set(caption.replace(",", " ").split())
        row = []
        for names in TEXT_LABELS.values():
            found = [j for j, name in enumerate(names) if name in words]
            row.append(found[0] if len(found) == 1 else -1)
        if min(row) >= 0:
            keep.append(i)
            labels.append(row)
    return np.asarray(keep, dtype=np.int64), torch.tensor(labels)


def _train(
    params: list[nn.Parameter],
    heads: nn.ModuleList,
    features: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    config: PretrainConfig,
) -> list[float]:
    """Minimise the summed cross-entropy of every head on batches of row indices."""
    optimizer = torch.optim.AdamW(
        [*params, *heads.parameters()], lr=config.lr, weight_decay=config.weight_decay
    )
    gen = torch.Generator().manual_seed(config.seed)
    losses = []
    for step in range(config.steps):
        warm = (step + 1) / config.warmup if step < config.warmup else 1.0
        progress = max(0, step - config.warmup) / max(1, config.steps - config.warmup)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(warm, 0.5 * (1.0 + math.cos(math.pi * progress)))
        idx = torch.randint(len(labels), (config.batch_size,), generator=gen)
        out = features(idx)
        loss = sum(F.cross_entropy(h(out), labels[idx, j]) for j, h in enumerate(heads))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _heads(dim: int, groups: dict) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(dim, len(names)) for names in groups.values())


def _stats(losses: list[float], n: int, began: float) -> dict:
    return {
        "pairs": n,
        "first_loss": round(float(np.mean(losses[:10])), 4),
        "final_loss": round(float(np.mean(losses[-10:])), 4),
        "seconds": round(time.perf_counter() - began, 2),
    }


def pretrain_image_tower(
    images: np.ndarray, concepts: Sequence[Concept], config: PretrainConfig
) -> tuple:
    """An mmc-tiny model whose visual tower learned to classify the images' attributes."""
    began = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model, _ = build_model()
        pixels = pixels_to_input(images, model)
        visual = model.visual.train()
        heads = _heads(int(visual.output_dim), IMAGE_LABELS)
        losses = _train(
            list(visual.parameters()),
            heads,
            lambda idx: visual(pixels[idx]),
            image_labels(concepts),
            config,
        )
    return model.eval(), _stats(losses, len(concepts), began)


def pretrain_text_tower(captions: Sequence[str], config: PretrainConfig) -> tuple:
    """An mmc-tiny model whose text tower learned to classify the attribute words of captions."""
    began = time.perf_counter()
    keep, labels = caption_labels(captions)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        model, tokenizer = build_model()
        tokens = tokenizer([captions[i] for i in keep])
        visual = {id(p) for p in model.visual.parameters()}
        params = [p for p in model.parameters() if id(p) not in visual and p.ndim > 0]
        model.train()
        heads = _heads(int(model.text_projection.shape[1]), TEXT_LABELS)
        losses = _train(
            params, heads, lambda idx: encode_text_prefix(model, tokens[idx]), labels, config
        )
    return model.eval(), _stats(losses, len(keep), began)


def save_towers(split: dict, config: PretrainConfig, directory: str | os.PathLike) -> dict:
    """Pretrain both towers on a teacher split, save them atomically under DIRECTORY, and
    return their student specs (`image_encoder`, `text_encoder`) and training stats."""
    root = Path(directory)
    image, image_stats = pretrain_image_tower(split["images"], split["concepts"], config)
    torch_save_atomic(image.state_dict(), root / "image_tower.pt")
    text, text_stats = pretrain_text_tower(split["captions"], config)
    torch_save_atomic(text.state_dict(), root / "text_tower.pt")
    return {
        "image_encoder": teacher_spec(root / "image_tower.pt"),
        "text_encoder": teacher_spec(root / "text_tower.pt"),
        "stats": {"image": image_stats, "text": text_stats},
    }
