"""Load a NormSim target set: an embedding store, a `.npy`, or a `.pt` tensor / dict of tensors."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmcurate.data.store import detect_keys, finished_stems, npz_keys, read_arrays
from mmcurate.errors import MmcurateError, UsageError

PT_KEYS = ("image_features",)
_CACHE: dict[tuple, Any] = {}


def _from_store(path: Path, img_key: str | None) -> np.ndarray:
    stems = finished_stems(path)
    if not stems:
        raise UsageError(f"target store {path} holds no finished stems")
    try:
        if img_key not in npz_keys(path, stems[0]):
            img_key = detect_keys(path, need_txt=False)[0]
        parts = [read_arrays(path, stem, [img_key])[img_key] for stem in stems]
    except MmcurateError as exc:
        raise UsageError(f"target store {path}: {exc}") from None
    return np.concatenate([np.asarray(p, dtype=np.float32) for p in parts])


def _from_pt(path: Path, img_key: str | None) -> np.ndarray:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load target {path} with weights_only=True: {first}") from None
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor) and v.ndim == 2}
        key = next((k for k in (*PT_KEYS, img_key) if k and k in tensors), None)
        if key is None and len(tensors) == 1:
            key = next(iter(tensors))
        if key is None:
            raise UsageError(
                f"target {path} is a dict without an {PT_KEYS[0]!r} or {img_key!r} matrix "
                f"(2-d tensors: {sorted(tensors)})"
            )
        obj = tensors[key]
    if not isinstance(obj, torch.Tensor):
        raise UsageError(f"target {path} holds a {type(obj).__name__}, not a tensor")
    return obj.detach().float().numpy()


def _load_one(path: Path, img_key: str | None) -> np.ndarray:
    if not path.exists():
        raise UsageError(f"target file not found: {path}")
    if path.is_dir():
        return _from_store(path, img_key)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.asarray(np.load(path, allow_pickle=False), dtype=np.float32)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read target {path}: {exc}") from None
    if suffix in (".pt", ".pth"):
        return _from_pt(path, img_key)
    raise UsageError(f"target {path}: expected an embedding store directory, .npy or .pt")


def load_target(
    paths: str | os.PathLike | Sequence[str | os.PathLike], img_key: str | None = None
) -> np.ndarray:
    """The L2-normalised target matrix T (n, d) float32; several paths are concatenated.

    A store target is read at `img_key` when its npz has it, else at its detected image key.
    """
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not items:
        raise UsageError("no target given")
    parts = [_load_one(Path(p), img_key) for p in items]
    for p, arr in zip(items, parts, strict=True):
        if arr.ndim != 2 or arr.shape[0] == 0:
            raise UsageError(f"target {p} must be a non-empty 2-d matrix, got shape {arr.shape}")
        if arr.shape[1] != parts[0].shape[1]:
            raise UsageError(
                f"target {p} has dim {arr.shape[1]}, target {items[0]} has dim {parts[0].shape[1]}"
            )
    targets = np.concatenate(parts) if len(parts) > 1 else parts[0]
    bad = ~np.isfinite(targets).all(axis=1)
    if bad.any():
        raise UsageError(f"target has {int(bad.sum())} row(s) with NaN or Inf")
    norms = np.linalg.norm(targets, axis=1, keepdims=True)
    if (norms == 0).any():
        raise UsageError(f"target has {int((norms == 0).sum())} all-zero row(s)")
    targets = np.ascontiguousarray(targets, dtype=np.float32)
    targets /= norms
    return targets


def _file_state(path: str) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return (path,)
    return (path, st.st_mtime_ns, st.st_size)


def cached_target(paths: Sequence[str], img_key: str | None) -> np.ndarray:
    """The loaded target matrix, cached per process (one target set, keyed by its files' state)."""
    key = ("T", tuple(_file_state(p) for p in paths), img_key)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = load_target(paths, img_key)
    return _CACHE[key]


def cached_derived(
    paths: Sequence[str], img_key: str | None, name: str, build: Callable[[np.ndarray], Any]
) -> Any:
    """What `build` makes from the cached target (a Gram matrix, an index), once per process."""
    targets = cached_target(paths, img_key)
    key = (name, tuple(_file_state(p) for p in paths), img_key)
    if key not in _CACHE:
        _CACHE[key] = build(targets)
    return _CACHE[key]
