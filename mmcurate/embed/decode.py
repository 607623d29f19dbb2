"""Image decoding for the embed stage: PIL in decode workers (`--decode cpu`), or
`torchvision.io.decode_jpeg` on the encoder's device (`--decode gpu`), falling back per image
to PIL for anything that does not decode there (PNG, WebP, CMYK, truncated files).

On a machine without a GPU, `--decode gpu` runs the same path with decode_jpeg on the CPU, so
the tests cover it. Device decoding resizes tensors, not PIL images: pixels differ slightly from
`--decode cpu` (antialiased bicubic either way), so the embeddings are close, not identical.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence

import torch

DECODERS = ("cpu", "gpu")
JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"
RGB_STEPS = ("MaybeConvertMode", "_convert_to_rgb", "to_rgb")


def decode_image(data: bytes, preprocess: Callable) -> torch.Tensor:
    """Decode image bytes fully with PIL (truncated files fail here, not later), preprocess."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return preprocess(im.convert("RGB"))


def _step_name(step: Callable) -> str:
    inner = getattr(step, "lambd", step)
    return getattr(inner, "__name__", type(inner).__name__)


def tensor_preprocess(preprocess: Callable) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The encoder's PIL preprocessing as steps on a decoded uint8 (3, H, W) tensor, or None
    when it holds a step with no tensor form (then every image goes through PIL)."""
    from torchvision import transforms as T

    steps: list[Callable] = []
    for step in getattr(preprocess, "transforms", [preprocess]):
        if isinstance(step, T.ToTensor):
            steps.append(lambda x: x.float().div_(255.0))
        elif isinstance(step, T.Resize | T.CenterCrop | T.Normalize):
            steps.append(step)
        elif any(name in _step_name(step) for name in RGB_STEPS):
            continue
        else:
            return None

    def run(x: torch.Tensor) -> torch.Tensor:
        for step in steps:
            x = step(x)
        return x

    return run


def _device_jpeg(data: bytes, device: torch.device) -> torch.Tensor | None:
    """decode_jpeg on the device, or None for anything that is not a complete JPEG there."""
    if not data.startswith(JPEG_START) or not data.rstrip(b"\x00").endswith(JPEG_END):
        return None
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities")
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            return None


def decode_on_device(
    images: Sequence[bytes], preprocess: Callable, device: torch.device
) -> tuple[list[torch.Tensor | None], int]:
    """Preprocessed pixels on `device` per image (None: undecodable), and how many images fell
    back to PIL on the CPU."""
    to_pixels = tensor_preprocess(preprocess)
    out: list[torch.Tensor | None] = []
    fallbacks = 0
    for data in images:
        decoded = _device_jpeg(data, device) if to_pixels is not None else None
        if decoded is not None:
            out.append(to_pixels(decoded))
            continue
        fallbacks += 1
        try:
            out.append(decode_image(data, preprocess).to(device))
        except Exception:
            out.append(None)
    return out, fallbacks
