"""Encoders behind one interface: L2-normalised image and text embeddings from any backend."""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mmcurate.embed.spec import EncoderSpec, parse_spec
from mmcurate.errors import UsageError

ASSETS = Path(__file__).parent / "assets"
TINY_IMAGE_SIZE = 32
TINY_TIMM = "test_resnet"
MAX_CAPTION_CHARS = 4096  # beyond any text tower's context; keeps tokenising huge captions cheap
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_DEVICE = "auto"


def check_device_name(name: str) -> None:
    """Refuse a device name other than auto, cpu, cuda or cuda:N."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(name)):
        raise UsageError(f"unknown device {name!r}: use auto, cpu or cuda")


def resolve_device(name: str = DEFAULT_DEVICE) -> torch.device:
    """`auto` picks CUDA when present; `cuda` without a GPU is refused."""
    check_device_name(name)
    if name == DEFAULT_DEVICE:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is visible to this process")
    return torch.device(name)


@dataclass
class Encoder:
    """A loaded encoder: `encode_images`/`encode_texts` return float32 CPU rows."""

    spec: str
    dim: int
    device: torch.device
    preprocess: Callable | None
    logit_scale: float | None
    image_fn: Callable[[torch.Tensor], torch.Tensor] | None
    text_fn: Callable[[list[str]], torch.Tensor] | None
    model: torch.nn.Module | None = None

    @property
    def fingerprint(self) -> str:
        """A short hash of the encoder's weights (students record where they started)."""
        return weights_fingerprint(self.model) if self.model is not None else ""

    @property
    def has_image(self) -> bool:
        """True when the encoder embeds images."""
        return self.image_fn is not None

    @property
    def has_text(self) -> bool:
        """True when the encoder embeds text."""
        return self.text_fn is not None

    def _run(self, fn: Callable, arg, normalize: bool) -> torch.Tensor:
        with (
            torch.inference_mode(),
            torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"),
        ):
            out = fn(arg).float()
        if normalize:
            out = F.normalize(out, dim=-1)
        return out.cpu()

    def encode_images(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(n, 3, H, W) preprocessed pixels -> (n, dim) embeddings."""
        if self.image_fn is None:
            raise UsageError(f"encoder {self.spec!r} has no image tower")
        return self._run(self.image_fn, pixels.to(self.device, non_blocking=True), normalize)

    def encode_texts(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Captions -> (n, dim) embeddings."""
        if self.text_fn is None:
            raise UsageError(f"encoder {self.spec!r} has no text tower")
        return self._run(self.text_fn, [t[:MAX_CAPTION_CHARS] for t in texts], normalize)


def _weights_error(spec: str, exc: Exception, local_form: str) -> UsageError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UsageError(
        f"cannot load weights for {spec!r} (offline or unknown name?): {reason[:200]}; "
        f"use the local form {local_form}"
    )


def _load_state_dict(path: str, spec: str) -> dict:
    """A checkpoint's tensors, loaded safely (safetensors or torch.load with weights_only)."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint of {spec!r} not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UsageError(f"checkpoint of {spec!r} is not a safe tensor file: {exc}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise UsageError(f"checkpoint of {spec!r} holds no state dict: {path}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha1 of a module's state (names, shapes, float32 values), 16 hex digits."""
    h = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(f"{name}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def is_random_start(s: EncoderSpec) -> bool:
    """True when a spec starts from random weights: `@random`, or a tiny config without a
    checkpoint."""
    return s.checkpoint == "random" or (s.is_tiny and s.checkpoint is None)


def _seeded_init(build: Callable):
    """Build a randomly initialised model identically in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def open_clip_model(s: EncoderSpec, spec: str, seeded: bool = True) -> tuple:
    """An open_clip model and its preprocessing with the spec's weights (`@random`: none; a
    tiny config: random unless `@ckpt`); a checkpoint that does not load is refused in one line."""
    import open_clip

    if s.is_tiny:
        open_clip.add_model_config(ASSETS / "mmc-tiny.json")
    if s.name not in open_clip.list_models():
        raise UsageError(f"bad encoder spec {spec!r}: open_clip has no model {s.name!r}")
    pretrained = None if s.checkpoint == "random" else s.pretrained
    try:
        build = functools.partial(
            open_clip.create_model_and_transforms, s.name, pretrained=pretrained
        )
        model, _, preprocess = _seeded_init(build) if seeded else build()
    except UsageError:
        raise
    except Exception as exc:
        raise _weights_error(spec, exc, f"open_clip:{s.name}@/path/to/checkpoint.pt") from None
    if s.checkpoint and s.checkpoint != "random":
        try:
            model.load_state_dict(_load_state_dict(s.checkpoint, spec))
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[0]
            raise UsageError(
                f"checkpoint of {spec!r} does not fit open_clip {s.name}: {reason[:200]}"
            ) from None
    return model, preprocess


def _open_clip(s: EncoderSpec, spec: str, device: torch.device) -> Encoder:
    import open_clip

    model, preprocess = open_clip_model(s, spec)
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(s.name)
    with torch.inference_mode():
        probe = torch.zeros(1, 3, *_image_size(preprocess), device=device)
        dim = int(model.encode_image(probe).shape[-1])
    return Encoder(
        spec=spec,
        dim=dim,
        device=device,
        preprocess=preprocess,
        logit_scale=float(model.logit_scale.exp().item()),
        image_fn=model.encode_image,
        text_fn=lambda texts: model.encode_text(tokenizer(texts).to(device)),
        model=model,
    )


def _image_size(preprocess) -> tuple[int, int]:
    """The square input size a torchvision preprocessing pipeline produces."""
    from PIL import Image

    return tuple(preprocess(Image.new("RGB", (8, 8))).shape[-2:])


def _to_rgb(image):
    """A PIL image in RGB (a no-op for tensors decoded as RGB on the device)."""
    return image.convert("RGB") if hasattr(image, "convert") else image


def _clip_transform(size: int, mean=CLIP_MEAN, std=CLIP_STD):
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.Lambda(_to_rgb),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def _hf_local(name: str) -> bool:
    return os.path.isdir(name)


def _hf_clip(s: EncoderSpec, spec: str, device: torch.device) -> Encoder:
    from transformers import AutoTokenizer, CLIPModel

    local = _hf_local(s.name)
    try:
        model = CLIPModel.from_pretrained(s.name, local_files_only=local).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(s.name, local_files_only=local)
    except Exception as exc:
        raise _weights_error(spec, exc, "hf-clip:/path/to/local/model_dir") from None
    mean, std = CLIP_MEAN, CLIP_STD
    try:
        from transformers import CLIPImageProcessor

        proc = CLIPImageProcessor.from_pretrained(s.name, local_files_only=local)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    except Exception:
        pass
    size = int(model.config.vision_config.image_size)
    max_len = int(model.config.text_config.max_position_embeddings)

    def image_fn(pixels: torch.Tensor) -> torch.Tensor:
        return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)

    def text_fn(texts: list[str]) -> torch.Tensor:
        tok = tokenizer(
            texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        )
        out = model.text_model(
            input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device)
        )
        return model.text_projection(out.pooler_output)

    return Encoder(
        spec=spec,
        dim=int(model.config.projection_dim),
        device=device,
        preprocess=_clip_transform(size, mean, std),
        logit_scale=float(model.logit_scale.exp().item()),
        image_fn=image_fn,
        text_fn=text_fn,
    )


def _timm(s: EncoderSpec, spec: str, device: torch.device) -> Encoder:
    import timm

    arch = TINY_TIMM if s.is_tiny else s.name
    if not timm.is_model(arch):
        raise UsageError(f"bad encoder spec {spec!r}: timm has no model {s.name!r}")
    pretrained = not is_random_start(s) and s.checkpoint is None
    try:
        model = _seeded_init(lambda: timm.create_model(arch, pretrained=pretrained, num_classes=0))
    except Exception as exc:
        raise _weights_error(spec, exc, f"timm:{s.name}@/path/to/weights.pth") from None
    if s.checkpoint and s.checkpoint != "random":
        state = _load_state_dict(s.checkpoint, spec)
        missing, _ = model.load_state_dict(state, strict=False)
        if missing:
            raise UsageError(
                f"checkpoint of {spec!r} does not fit {arch}: {len(missing)} missing tensors "
                f"(first: {missing[0]})"
            )
    model = model.to(device).eval()
    if s.is_tiny:
        preprocess = _clip_transform(TINY_IMAGE_SIZE, (0.5,) * 3, (0.5,) * 3)
    else:
        cfg = timm.data.resolve_data_config({}, model=model)
        preprocess = timm.data.create_transform(**cfg)
    return Encoder(
        spec=spec,
        dim=int(model.num_features),
        device=device,
        preprocess=preprocess,
        logit_scale=None,
        image_fn=model,
        text_fn=None,
        model=model,
    )


def _tiny_bert():
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = str(ASSETS / "mmc-tiny-bert-vocab.txt")
    params = inspect.signature(BertTokenizer.__init__).parameters
    tokenizer = BertTokenizer(**{"vocab" if "vocab" in params else "vocab_file": vocab})
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        initializer_range=0.2,
    )
    return _seeded_init(lambda: BertModel(config)), tokenizer


def _hf_text(s: EncoderSpec, spec: str, device: torch.device) -> Encoder:
    from transformers import AutoModel, AutoTokenizer

    if s.is_tiny:
        model, tokenizer = _tiny_bert()
    else:
        from transformers import AutoConfig

        local = _hf_local(s.name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(s.name, local_files_only=local)
            if s.checkpoint == "random":
                config = AutoConfig.from_pretrained(s.name, local_files_only=local)
            else:
                model = AutoModel.from_pretrained(s.name, local_files_only=local)
        except Exception as exc:
            raise _weights_error(spec, exc, "hf-text:/path/to/local/model_dir") from None
        if s.checkpoint == "random":
            model = _seeded_init(lambda: AutoModel.from_config(config))
    model = model.to(device).eval()
    max_len = min(int(getattr(model.config, "max_position_embeddings", 512)), 512)

    def text_fn(texts: list[str]) -> torch.Tensor:
        tok = tokenizer(
            texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        )
        tok = {k: v.to(device) for k, v in tok.items()}
        return model(**tok).last_hidden_state[:, 0, :]

    return Encoder(
        spec=spec,
        dim=int(model.config.hidden_size),
        device=device,
        preprocess=None,
        logit_scale=None,
        image_fn=None,
        text_fn=text_fn,
        model=model,
    )


_BUILDERS = {"open_clip": _open_clip, "hf-clip": _hf_clip, "timm": _timm, "hf-text": _hf_text}


@functools.lru_cache(maxsize=4)
def _cached(spec: str, device: str) -> Encoder:
    parsed = parse_spec(spec)
    return _BUILDERS[parsed.kind](parsed, spec, torch.device(device))


def load_encoder(spec: str, device: str = DEFAULT_DEVICE) -> Encoder:
    """Turn a spec string into a ready encoder; loaded once per process and device."""
    parse_spec(spec)
    return _cached(spec, str(resolve_device(device)))
