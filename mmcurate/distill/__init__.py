"""LoRS distillation: students, similarity mining, expert buffers, trajectory matching."""

from mmcurate.distill.buffers import BufferConfig, Buffers, load_buffers, make_buffers
from mmcurate.distill.data import PairSet, load_pairs, pairs_from_arrays, save_pairs
from mmcurate.distill.distiller import distill, export_artifact, load_artifact
from mmcurate.distill.evaluate import (
    EvalConfig,
    artifact_set,
    evaluate_small_set,
    mtt_artifact,
    random_set,
)
from mmcurate.distill.presets import PRESETS, DistillConfig, resolve_config

__all__ = [
    "PRESETS",
    "BufferConfig",
    "Buffers",
    "DistillConfig",
    "EvalConfig",
    "PairSet",
    "artifact_set",
    "distill",
    "evaluate_small_set",
    "export_artifact",
    "load_artifact",
    "load_buffers",
    "load_pairs",
    "make_buffers",
    "mtt_artifact",
    "pairs_from_arrays",
    "random_set",
    "resolve_config",
    "save_pairs",
]
