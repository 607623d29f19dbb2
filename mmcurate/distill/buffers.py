"""Expert buffers (SPEC §6): E students trained on the real pairs, their parameters per epoch.

Each expert is one work item on the engine; its file `expert_XXX.pt` is written atomically
and holds {"image": (T+1, P_img), "text": (T+1, P_txt), "meta": dict}. The seeds of an expert
derive from the global seed and its index only, so results do not depend on the executor
or the number of workers. A second run skips the experts whose file is complete.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcurate.data.atomic import read_json_dict, torch_save_atomic, write_json_atomic
from mmcurate.data.markers import check_file, file_is_done, mark_file
from mmcurate.data.store import read_done
from mmcurate.distill.augment import (
    ExpertAugment,
    check_resize,
    normalization,
    protocol_meta,
)
from mmcurate.distill.data import PairSet, from_cache, memory_stem, prepare_pairs, save_pairs
from mmcurate.distill.heap import keep_freed_heap
from mmcurate.distill.losses import symmetric_ce
from mmcurate.distill.sources import absolute_data
from mmcurate.distill.students import build_student, normalize_images
from mmcurate.distill.towers import (
    canonical_image_encoder,
    check_expected_towers,
    load_text_encoder,
    tower_weights,
)
from mmcurate.embed import DEFAULT_DEVICE
from mmcurate.engine import Executor, run_stage, summarise
from mmcurate.errors import MmcurateError, ShardError, UsageError

MANIFEST = "buffers.json"
FORMAT_VERSION = 2  # 2: the image protocol (augment, normalize, resize, drop_last) is recorded
ARCH_KEYS = ("image_encoder", "text_encoder", "image_size")
PROTOCOL_KEYS = ("augment", "normalize", "resize")
LEGACY_PROTOCOL = {"augment": False, "normalize": "imagenet", "resize": "crop"}


@dataclass(frozen=True)
class BufferConfig:
    """Settings of `mmcurate buffer` (published: 20 experts × 10 epochs, SGD lr 0.1, batch 128,
    the reference's augmentation, CLIP mean/std, squash resize, drop_last)."""

    experts: int = 20
    epochs: int = 10
    lr: float = 0.1
    batch_size: int = 128
    image_encoder: str = "nfnet_l0"
    text_encoder: str = "hf-text:bert-base-uncased"
    image_size: int = 224
    augment: bool = True
    normalize: str = "clip"
    resize: str = "squash"
    seed: int = 0

    def check(self) -> BufferConfig:
        """Refuse settings that cannot run."""
        if self.experts < 1 or self.epochs < 1 or self.batch_size < 1:
            raise UsageError("--experts, --epochs and --batch-size must be >= 1")
        if not self.lr > 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        if self.image_size < 8:
            raise UsageError(f"--image-size must be >= 8, got {self.image_size}")
        normalization(self.normalize)
        check_resize(self.resize)
        return self


@dataclass(frozen=True)
class ExpertItem:
    """A buffer work item: expert `index`, named after its file."""

    name: str
    index: int


def derive_seed(seed: int, *path: int) -> int:
    """A 31-bit seed that depends only on the global seed and the given indices."""
    return int(np.random.SeedSequence([int(seed), *map(int, path)]).generate_state(1)[0] >> 1)


def expert_path(out_dir: str | os.PathLike, index: int) -> Path:
    """Where expert `index` is stored."""
    return Path(out_dir) / f"expert_{index:03d}.pt"


def expert_trajectory(
    pairs: PairSet, config: BufferConfig, index: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train expert `index` with symmetric CE; its flat parameters at init and after each epoch."""
    keep_freed_heap()
    device = torch.device(device)
    seed = derive_seed(config.seed, index)
    student = build_student(
        config.image_encoder, pairs.text_dim, pairs.image_size, seed, device
    ).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=config.lr)
    order = torch.Generator().manual_seed(derive_seed(config.seed, index, 1))
    draws = torch.Generator().manual_seed(derive_seed(config.seed, index, 3))
    batch = expert_batches(pairs, config, draws, device)
    snaps_img, snaps_txt = [], []

    def snapshot() -> None:
        p_img, p_txt = student.flat()
        snaps_img.append(p_img.float().cpu())
        snaps_txt.append(p_txt.float().cpu())

    snapshot()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(config.seed, index, 2))
        for _ in range(config.epochs):
            for idx in epoch_batches(pairs.n_pairs, config.batch_size, order):
                images, texts = batch(idx)
                loss = symmetric_ce(student(images, texts))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if not torch.isfinite(loss):
                raise ShardError(f"expert {index}: training loss became {loss.item()}")
            snapshot()
    return torch.stack(snaps_img), torch.stack(snaps_txt)


def epoch_batches(n: int, batch_size: int, order: torch.Generator) -> list[torch.Tensor]:
    """One epoch's batches: a random permutation cut into full batches (drop_last)."""
    perm = torch.randperm(n, generator=order)
    return [perm[s : s + batch_size] for s in range(0, n - batch_size + 1, batch_size)]


def expert_batches(pairs: PairSet, config: BufferConfig, draws: torch.Generator, device):
    """A function from pair indices to the (images, texts) an expert trains on: the cached
    pixels augmented (when the protocol says so) and normalised, and the text features."""
    mean, std = normalization(config.normalize)
    augment = ExpertAugment(pairs.image_size) if config.augment else None

    def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = pairs.pixels(idx.numpy()).to(device)
        if augment is not None:
            pixels = augment(pixels, draws)
        return normalize_images(pixels, mean, std), pairs.texts[idx].to(device)

    return batch


def expert_meta(config: BufferConfig, pairs: PairSet, index: int, student_dims: dict) -> dict:
    """Metadata stored in each expert file (plain types only), with the image protocol."""
    return {
        "version": FORMAT_VERSION,
        "expert": index,
        **asdict(config),
        **student_dims,
        "text_dim": pairs.text_dim,
        "pairs": pairs.n_pairs,
        "data": pairs.source,
        "protocol": protocol_meta(
            config.augment, config.normalize, config.resize, pairs.image_size
        ),
        "mean": list(normalization(config.normalize)[0]),
        "std": list(normalization(config.normalize)[1]),
    }


def _dims(config: BufferConfig) -> dict:
    """The student's sizes and where its towers start; refuses towers that do not load."""
    text_dim = int(load_text_encoder(config.text_encoder).dim)
    student = build_student(config.image_encoder, text_dim, config.image_size, 0)
    return {
        "n_img": student.image_layout.size,
        "n_txt": student.text_layout.size,
        "embed_dim": student.embed_dim,
        **tower_weights(config.image_encoder, config.text_encoder, config.image_size),
    }


def train_expert(
    item: ExpertItem,
    *,
    cache_dir: str,
    stem: str,
    config: dict,
    dims: dict,
    out_dir: str,
    device: str,
) -> dict:
    """Work item: train one expert from the memory-mapped data cache and save its file."""
    from mmcurate.embed import resolve_device

    cfg = BufferConfig(**config)
    pairs = from_cache(cache_dir, stem)
    index = item.index
    traj_img, traj_txt = expert_trajectory(pairs, cfg, index, resolve_device(device))
    payload = {"image": traj_img, "text": traj_txt, "meta": expert_meta(cfg, pairs, index, dims)}
    torch_save_atomic(payload, expert_path(out_dir, index))
    mark_file(expert_path(out_dir, index))
    return {"rows": pairs.n_pairs * cfg.epochs, "expert": index}


def read_expert(path: str | os.PathLike, mmap: bool = True) -> dict:
    """Load an expert file with weights_only=True and check its layout; UsageError if corrupt."""
    path = Path(path)
    try:
        check_file(path)
    except ShardError as exc:
        raise UsageError(f"corrupt buffer file {exc}") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"corrupt buffer file {path}: {reason[:200]}") from None
    if not isinstance(data, dict) or not {"image", "text", "meta"} <= set(data):
        raise UsageError(f"corrupt buffer file {path}: expected keys image, text, meta")
    img, txt, meta = data["image"], data["text"], data["meta"]
    ok = (
        isinstance(img, torch.Tensor)
        and isinstance(txt, torch.Tensor)
        and isinstance(meta, dict)
        and img.ndim == 2
        and txt.ndim == 2
        and img.shape[0] == txt.shape[0] == int(meta.get("epochs", -2)) + 1
        and img.shape[1] == meta.get("n_img")
        and txt.shape[1] == meta.get("n_txt")
    )
    if not ok:
        raise UsageError(f"corrupt buffer file {path}: tensor shapes do not match its metadata")
    return data


def _expert_complete(path: Path, expected: dict) -> bool:
    if not file_is_done(path):
        return False
    try:
        meta = read_expert(path)["meta"]
    except MmcurateError:
        return False
    return all(meta.get(k) == v for k, v in expected.items())


def make_buffers(
    data: str | PairSet,
    out_dir: str | os.PathLike,
    config: BufferConfig,
    executor: Executor,
    *,
    cache_dir: str | os.PathLike | None = None,
    image_root: str | None = None,
    device: str = DEFAULT_DEVICE,
) -> dict[str, Any]:
    """Train the missing experts of OUT_DIR on DATA (a path or a PairSet); returns a summary."""
    config = replace(config, image_encoder=canonical_image_encoder(config.image_encoder)).check()
    out = Path(out_dir)
    _check_manifest(out, config, None)
    dims = _dims(config)
    cache = Path(cache_dir) if cache_dir else out / "cache"
    if isinstance(data, PairSet):
        if data.image_size != config.image_size or data.text_encoder != config.text_encoder:
            raise UsageError(
                f"the pairs are {data.image_size} px with {data.text_encoder!r} texts, the "
                f"config asks for {config.image_size} px and {config.text_encoder!r}"
            )
        if data.resize != config.resize:
            raise UsageError(
                f"the pairs were resized with {data.resize!r}, the config asks for "
                f"{config.resize!r}"
            )
        stem = memory_stem(data)
        if read_done(cache, stem) is None:
            save_pairs(data, cache, stem)
    else:
        data = absolute_data(str(data))
        stem = prepare_pairs(
            data,
            image_size=config.image_size,
            text_encoder=config.text_encoder,
            cache_dir=cache,
            image_root=image_root,
            device=device,
            resize=config.resize,
        )
    pairs = from_cache(cache, stem)
    if pairs.n_pairs < config.batch_size:
        raise UsageError(
            f"--batch-size {config.batch_size} exceeds the {pairs.n_pairs} real pairs: experts "
            "train on full batches only (drop_last)"
        )
    source = data.source if isinstance(data, PairSet) else str(data)
    _check_manifest(out, config, stem)
    write_json_atomic(
        out / MANIFEST,
        {"version": FORMAT_VERSION, **asdict(config), **dims, "data": source, "cache": stem},
    )
    expected = {**asdict(config), **dims, "version": FORMAT_VERSION, "text_dim": pairs.text_dim}
    expected.pop("experts")
    items = [ExpertItem(expert_path(out, i).stem, i) for i in range(config.experts)]
    fn = functools.partial(
        train_expert,
        cache_dir=str(cache),
        stem=stem,
        config=asdict(config),
        dims=dims,
        out_dir=str(out),
        device=device,
    )
    outcomes, skipped = run_stage(
        executor,
        fn,
        items,
        is_done=lambda it: _expert_complete(expert_path(out, it.index), expected),
        desc="experts",
        count_key="rows",
    )
    summary = summarise(outcomes, skipped)
    summary.update(
        {
            "pairs": pairs.n_pairs,
            "images": pairs.n_images,
            "image_encoder": config.image_encoder,
            **dims,
        }
    )
    return summary


def _check_manifest(out: Path, config: BufferConfig, stem: str | None) -> None:
    """Refuse to mix experts of different settings or data in one directory."""
    old = read_json_dict(out / MANIFEST)
    if old is None:
        return
    keys = (*ARCH_KEYS, *PROTOCOL_KEYS, "epochs", "lr", "batch_size", "seed")
    old = {**LEGACY_PROTOCOL, **old} if old.get("version", 1) < 2 else old
    diff = [k for k in keys if k in old and old[k] != getattr(config, k)]
    if diff:
        k = diff[0]
        raise UsageError(
            f"{out} holds buffers made with {k}={old[k]!r}, not {getattr(config, k)!r}; "
            "use another --out"
        )
    if stem is not None and old.get("cache") not in (None, stem):
        raise UsageError(
            f"{out} holds buffers made from other data ({old.get('data')}); use another --out"
        )


@dataclass
class Buffers:
    """The expert trajectories of a buffer directory, memory-mapped."""

    directory: Path
    meta: dict
    experts: list[dict]

    @property
    def epochs(self) -> int:
        """T, the epochs per expert (each holds T+1 snapshots)."""
        return int(self.meta["epochs"])

    def segment(self, expert: int, start: int, length: int) -> tuple[torch.Tensor, ...]:
        """(θ_img[start], θ_txt[start], θ_img[start+length], θ_txt[start+length])."""
        e = self.experts[expert]
        end = start + length
        return e["image"][start], e["text"][start], e["image"][end], e["text"][end]


def expert_paths(directory: str | os.PathLike) -> list[Path]:
    """The expert files of DIRECTORY, refused in one line when there are none."""
    root = Path(directory)
    paths = sorted(root.glob("expert_*.pt")) if root.is_dir() else []
    if not paths:
        raise UsageError(f"no expert buffers (expert_*.pt) in {root}; run `mmcurate buffer` first")
    return paths


def load_buffers(directory: str | os.PathLike, expect: dict | None = None) -> Buffers:
    """All expert files of DIRECTORY, validated; `expect` pins image/text encoder, image size,
    normalisation and resize mode. Files of format 1 get the protocol they were made with."""
    root = Path(directory)
    paths = expert_paths(root)
    experts = [read_expert(p) for p in paths]
    for e in experts:
        if e["meta"].get("version", 1) < 2:
            e["meta"] = {**LEGACY_PROTOCOL, **e["meta"]}
    meta = dict(experts[0]["meta"])
    for path, e in zip(paths[1:], experts[1:], strict=True):
        for key in (*ARCH_KEYS, *PROTOCOL_KEYS, "epochs", "n_img", "n_txt"):
            if e["meta"].get(key) != meta.get(key):
                raise UsageError(f"buffer file {path} differs from the others in {key}")
    expect = dict(expect or {})
    check_expected_towers(meta, expect, str(root))
    for key in ("image_encoder", "text_encoder", "image_weights", "text_weights"):
        expect.pop(key, None)
    labels = {"normalize": "image normalisation", "resize": "resize mode"}
    for key, value in expect.items():
        if value is not None and meta.get(key) != value:
            raise UsageError(
                f"buffers in {root} were made for {labels.get(key, key.replace('_', ' '))} "
                f"{meta.get(key)!r}, not {value!r}"
            )
    return Buffers(root, meta, experts)
