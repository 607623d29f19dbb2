"""Exporting a distilled set for people: a PNG grid, one PNG per image, nearest real captions."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmcurate.data.atomic import write_bytes_atomic, write_json_atomic
from mmcurate.distill.data import PairSet
from mmcurate.distill.students import denormalize_images


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def image_grid(images: torch.Tensor, mean, std, columns: int = 10, pad: int = 2) -> np.ndarray:
    """Normalised (N,3,H,W) images as one uint8 HWC grid, `columns` per row."""
    x = denormalize_images(images.float(), mean, std)
    n, _, h, w = x.shape
    cols = min(columns, n)
    rows = -(-n // cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    pix = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top : top + h, left : left + w] = pix[i]
    return grid


def nearest_captions(texts: torch.Tensor, real: PairSet) -> list[tuple[str, float]]:
    """For each synthetic text embedding, the real caption closest in cosine and the cosine."""
    syn = F.normalize(texts.float(), dim=1)
    ref = F.normalize(real.texts.float(), dim=1)
    sims = syn @ ref.T
    best = sims.max(dim=1)
    pairs = zip(best.values.tolist(), best.indices.tolist(), strict=True)
    return [(real.captions[j], v) for v, j in pairs]


def export_artifact(art: dict, out_dir: str | os.PathLike, real: PairSet) -> dict[str, Any]:
    """Write DIR/images.png (the grid), DIR/images/NNN.png and DIR/captions.json/.txt."""
    out = Path(out_dir)
    cfg = art["config"]
    mean, std = cfg.get("mean"), cfg.get("std")
    write_bytes_atomic(out / "images.png", _png_bytes(image_grid(art["images"], mean, std)))
    singles = (denormalize_images(art["images"].float(), mean, std) * 255).round()
    singles = singles.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, pixels in enumerate(singles):
        write_bytes_atomic(out / "images" / f"{i:03d}.png", _png_bytes(pixels))
    nearest = nearest_captions(art["texts"], real)
    rows = [
        {"index": i, "caption": cap, "cosine": round(cos, 4), "init_uid": uid}
        for i, ((cap, cos), uid) in enumerate(zip(nearest, art["provenance"]["uids"], strict=True))
    ]
    write_json_atomic(out / "captions.json", rows)
    text = "".join(f"{r['index']:03d}\t{r['cosine']:.3f}\t{r['caption']}\n" for r in rows)
    write_bytes_atomic(out / "captions.txt", text.encode())
    mean_cosine = float(np.mean([r["cosine"] for r in rows]))
    return {"images": len(singles), "dir": str(out), "mean_cosine": mean_cosine}
