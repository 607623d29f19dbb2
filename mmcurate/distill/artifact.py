"""The distilled artifact of SPEC §8: loading it safely, and what it was made with."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mmcurate.distill.presets import DistillConfig, config_from_dict
from mmcurate.distill.similarity import similarity_from_export
from mmcurate.errors import UsageError


def load_artifact(path: str | os.PathLike) -> dict[str, Any]:
    """A distilled artifact, loaded with weights_only=True and checked against SPEC §8."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"distilled file not found: {path}")
    try:
        art = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"corrupt distilled file {path}: {reason[:200]}") from None
    keys = {"images", "texts", "similarity", "lr_img", "lr_txt", "config", "provenance"}
    if not isinstance(art, dict) or not keys <= set(art):
        raise UsageError(f"{path} is not a distilled artifact (keys {sorted(keys)} expected)")
    sim = art["similarity"]
    if not isinstance(sim, dict) or not {"a", "L", "R", "alpha", "rank"} <= set(sim):
        raise UsageError(f"{path}: similarity needs a, L, R, alpha and rank")
    n = art["images"].shape[0]
    if art["texts"].shape[0] != n or sim["a"].shape[0] != n or sim["L"].shape[0] != n:
        raise UsageError(f"{path}: images, texts and similarity disagree on N")
    return art


def artifact_config_of(art: dict) -> DistillConfig:
    """The DistillConfig an artifact was made with."""
    return config_from_dict(art["config"])


def similarity_matrix(art: dict) -> torch.Tensor:
    """The N×N matrix S of an artifact."""
    return similarity_from_export(art["similarity"]).matrix().detach()
