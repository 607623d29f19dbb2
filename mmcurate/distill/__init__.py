"""LoRS distillation: students, similarity mining, expert buffers, trajectory matching."""

from mmcurate.distill.artifact import load_artifact
from mmcurate.distill.buffers import BufferConfig, Buffers, load_buffers, make_buffers
from mmcurate.distill.data import PairSet, load_pairs, pairs_from_arrays, save_pairs
from mmcurate.distill.distiller import distill, run_distill
from mmcurate.distill.evaluate import (
    EvalConfig,
    artifact_set,
    evaluate_small_set,
    full_set,
    mtt_artifact,
    random_set,
)
from mmcurate.distill.evaluate_stage import run_evaluate
from mmcurate.distill.export import export_artifact
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
    "full_set",
    "load_artifact",
    "load_buffers",
    "load_pairs",
    "make_buffers",
    "mtt_artifact",
    "pairs_from_arrays",
    "random_set",
    "resolve_config",
    "run_distill",
    "run_evaluate",
    "save_pairs",
]
