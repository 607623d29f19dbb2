"""A tiny CLIP teacher for the demo: the `open_clip:mmc-tiny` architecture trained on clean pairs.

The pipeline then loads it as `open_clip:mmc-tiny@PATH`, the same way a user points mmcurate at
a local open_clip checkpoint. Training is deterministic for a seed on one thread.
"""

from __future__ import annotations

import io
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmcurate.data.atomic import torch_save_atomic
from mmcurate.demo.corpus import encode_image

ARCH = "mmc-tiny"


@dataclass(frozen=True)
class TeacherConfig:
    """Contrastive training settings of the demo teacher."""

    steps: int = 300
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 30
    seed: int = 0


def build_model():
    """A freshly initialised mmc-tiny open_clip model and its tokenizer."""
    import open_clip

    from mmcurate.embed.encoders import ASSETS

    open_clip.add_model_config(ASSETS / "mmc-tiny.json")
    model = open_clip.create_model(ARCH, pretrained=None)
    return model, open_clip.get_tokenizer(ARCH)


def pixels_to_input(images: np.ndarray, model) -> torch.Tensor:
    """uint8 (n,H,W,3) images -> the normalised tensors the encoder's preprocessing gives.

    Each image goes through a JPEG round trip first, as the pool's images do in their shards.
    """
    decoded = []
    for img in images:
        with Image.open(io.BytesIO(encode_image(img))) as im:
            decoded.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    x = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).float().div_(255.0)
    cfg = model.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def encode_text_prefix(model, tokens: torch.Tensor) -> torch.Tensor:
    """`model.encode_text` computed on the tokens up to the longest caption's end token.

    The text tower is causal and pools at the end token, so the padding after it does not
    change the result (up to float rounding); skipping it makes training much faster.
    """
    from open_clip.transformer import text_global_pool

    length = int((tokens != 0).sum(dim=1).max())
    tokens = tokens[:, :length]
    x = model.token_embedding(tokens) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = text_global_pool(model.ln_final(x), tokens, model.text_pool_type)
    return x @ model.text_projection


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, scale
) -> torch.Tensor:
    """Symmetric InfoNCE of normalised features at logit scale `scale` (the CLIP loss)."""
    logits = scale * image_features @ text_features.t()
    labels = torch.arange(len(logits))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def _lr_at(step: int, config: TeacherConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_teacher(images: np.ndarray, captions: list[str], config: TeacherConfig) -> tuple:
    """Train mmc-tiny contrastively on (images, captions); returns (model, stats)."""
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model, tokenizer = build_model()
        pixels = pixels_to_input(images, model)
        tokens = tokenizer(list(captions))
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit" not in n]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "logit" in n]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.lr,
        )
        gen = torch.Generator().manual_seed(config.seed)
        model.train()
        losses = []
        n = len(captions)
        perm, cursor = torch.randperm(n, generator=gen), 0
        for step in range(config.steps):
            if cursor + config.batch_size > n:
                perm, cursor = torch.randperm(n, generator=gen), 0
            idx = perm[cursor : cursor + config.batch_size]
            cursor += config.batch_size
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, config)
            f = F.normalize(model.encode_image(pixels[idx]), dim=-1)
            g = F.normalize(encode_text_prefix(model, tokens[idx]), dim=-1)
            loss = contrastive_loss(f, g, model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(float(loss.detach()))
    model.eval()
    scale = float(model.logit_scale.detach().exp())
    stats = {
        "steps": config.steps,
        "pairs": n,
        "first_loss": round(float(np.mean(losses[:10])), 4),
        "final_loss": round(float(np.mean(losses[-10:])), 4),
        "logit_scale": scale,
        "tau": 1.0 / scale,
        "seconds": round(time.perf_counter() - start, 2),
    }
    return model, stats


def teacher_spec(path: str | os.PathLike) -> str:
    """The encoder spec that loads a saved teacher."""
    return f"open_clip:{ARCH}@{os.fspath(path)}"


def save_teacher(model, path: str | os.PathLike) -> str:
    """Save the state dict atomically; returns the encoder spec that loads it."""
    torch_save_atomic(model.state_dict(), path)
    return teacher_spec(path)
