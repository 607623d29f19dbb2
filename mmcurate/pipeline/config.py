"""The pipeline config (`CONFIG.toml`): its schema, loading and validation.

Every stage's keys and defaults are read from that stage's config dataclass, so a default
changed there changes the CLI, the library and the pipeline together. Relative paths in the
config (also a checkpoint after `@` in an encoder spec) are relative to the config file's
directory.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from mmcurate.curate.reshard import ReshardConfig
from mmcurate.curate.rules import parse_rule
from mmcurate.curate.score_config import ScoreConfig
from mmcurate.curate.select import SelectConfig
from mmcurate.distill.buffers import BufferConfig
from mmcurate.distill.distiller import SAVE_EVERY
from mmcurate.distill.evaluate import EvalConfig
from mmcurate.distill.evaluate_stage import BASELINES
from mmcurate.distill.presets import DistillConfig, resolve_config
from mmcurate.embed import DEFAULT_DEVICE
from mmcurate.embed.stage import EmbedConfig
from mmcurate.engine import ExecutorConfig
from mmcurate.errors import UsageError

STAGES = ("embed", "score", "select", "reshard", "buffer", "distill", "evaluate")


@dataclass(frozen=True)
class PipelineSettings:
    """The config's top-level keys besides the executor's: output root, seed, device, and how
    many failed work items a stage tolerates."""

    out: str | None = None
    seed: int = 0
    device: str = DEFAULT_DEVICE
    max_failed_items: int = 0


def options(cls: type, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config dataclass's fields and defaults as config keys (None where it has no default)."""
    return {
        f.name: None if f.default is MISSING else f.default
        for f in fields(cls)
        if f.name not in drop
    }


TOP_LEVEL = {**options(PipelineSettings), **options(ExecutorConfig)}
DISTILL_KEYS = tuple(k for k in options(DistillConfig) if k not in ("seed", "preset"))
DEFAULTS: dict[str, dict[str, Any]] = {
    "embed": {"src": None, "target_src": None, **options(EmbedConfig, ("modality", "device"))},
    "score": {"store": None, **options(ScoreConfig, ("seed", "device"))},
    "select": {"scores": None, **options(SelectConfig, ("store", "img_key", "seed", "device"))},
    "reshard": {"src": None, "subset": None, **options(ReshardConfig)},
    "buffer": {"data": None, "image_root": None, **options(BufferConfig, ("seed",))},
    "distill": {
        "data": None,
        "buffers": None,
        "image_root": None,
        "preset": DistillConfig.preset,
        "save_every": SAVE_EVERY,
    },
    "evaluate": {
        "artifact": None,
        "train": None,
        "test": None,
        "image_root": None,
        "num_eval": EvalConfig.num_eval,
        "epochs": EvalConfig.epochs,
        "eval_momentum": EvalConfig.momentum,
        "protocol": EvalConfig.protocol,
        "baselines": ["random"],
    },
}
PATH_KEYS = {
    "embed": ("src", "target_src"),
    "score": ("store", "target", "lang_model", "centroids"),
    "select": ("scores", "union", "intersect", "centroids", "target", "wordnet", "save_centroids"),
    "reshard": ("src", "subset"),
    "buffer": ("data", "image_root"),
    "distill": ("data", "buffers", "image_root"),
    "evaluate": ("artifact", "train", "test", "image_root"),
}
SPEC_KEYS = {"embed": ("model", "text_model"), "buffer": ("image_encoder",)}


def as_list(value: Any) -> list:
    """A config value that may be one item or a list, as a list."""
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def build(cls: type, section: dict[str, Any], **extra: Any) -> Any:
    """The stage's config dataclass from its section (lists become tuples where it has tuples)."""
    values = {}
    for f in fields(cls):
        if f.name in extra:
            values[f.name] = extra[f.name]
        elif f.name in section:
            value = section[f.name]
            values[f.name] = tuple(as_list(value)) if isinstance(f.default, tuple) else value
    return cls(**values)


def _resolve_path(value: Any, base: Path) -> Any:
    if value is None:
        return None
    if isinstance(value, list | tuple):
        return [_resolve_path(v, base) for v in value]
    text = str(value)
    if "://" in text or os.path.isabs(text):
        return text
    return str(base / text)


def _resolve_spec(spec: Any, base: Path) -> Any:
    """An encoder spec whose `@checkpoint` is a relative path, made relative to `base`."""
    if not isinstance(spec, str) or "@" not in spec:
        return spec
    head, path = spec.split("@", 1)
    if path == "random" or os.path.isabs(path) or "://" in path:
        return spec
    return f"{head}@{base / path}"


@dataclass
class Plan:
    """A parsed config: global settings and every present stage's effective settings."""

    config_path: Path
    out: Path
    settings: dict[str, Any]
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        """The global seed every stage derives its seeds from."""
        return int(self.settings["seed"])

    @property
    def executor(self) -> ExecutorConfig:
        """Where the stages' work items run."""
        return build(ExecutorConfig, self.settings)

    def stage_dir(self, stage: str) -> Path:
        """Where a stage writes its outputs."""
        return self.out / stage


def load_plan(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Plan:
    """Read CONFIG.toml, fill defaults, resolve paths; refuse unknown keys and missing inputs."""
    config_path = Path(path)
    if not config_path.is_file():
        raise UsageError(f"pipeline config not found: {config_path}")
    try:
        raw = tomllib.loads(config_path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{config_path}: not valid TOML ({exc})") from None
    return plan_from_dict(raw, config_path, overrides)


def plan_from_dict(
    raw: dict[str, Any], config_path: Path, overrides: dict[str, Any] | None = None
) -> Plan:
    """Build a Plan from a parsed TOML document (paths relative to the config's directory)."""
    base = config_path.resolve().parent
    raw = copy.deepcopy(raw)
    unknown = sorted(set(raw) - set(TOP_LEVEL) - set(STAGES))
    if unknown:
        raise UsageError(
            f"{config_path}: unknown key or section {unknown[0]!r} "
            f"(sections: {', '.join(STAGES)}; keys: {', '.join(TOP_LEVEL)})"
        )
    settings = {k: raw.get(k, v) for k, v in TOP_LEVEL.items()}
    settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if not settings["out"]:
        raise UsageError(f'{config_path}: set out = "DIR" (where every stage writes)')
    out = Path(_resolve_path(settings["out"], base))
    plan = Plan(config_path, out, settings)
    for stage in STAGES:
        if stage not in raw:
            continue
        section = raw[stage]
        if not isinstance(section, dict):
            raise UsageError(f"{config_path}: [{stage}] must be a table")
        allowed = set(DEFAULTS[stage]) | (set(DISTILL_KEYS) if stage == "distill" else set())
        bad = sorted(set(section) - allowed)
        if bad:
            raise UsageError(
                f"{config_path}: unknown key {bad[0]!r} in [{stage}] "
                f"(known: {', '.join(sorted(allowed))})"
            )
        merged = {**DEFAULTS[stage], **section}
        for key in PATH_KEYS[stage]:
            merged[key] = _resolve_path(merged[key], base)
        for key in SPEC_KEYS.get(stage, ()):
            merged[key] = _resolve_spec(merged[key], base)
        plan.stages[stage] = merged
    if not plan.stages:
        raise UsageError(f"{config_path}: no stage sections (use some of {', '.join(STAGES)})")
    _check_values(plan)
    _check_wiring(plan)
    return plan


def distill_config(section: dict[str, Any], seed: int) -> DistillConfig:
    """The distill stage's DistillConfig: its preset with the section's overrides."""
    overrides = {k: v for k, v in section.items() if k in DISTILL_KEYS}
    return resolve_config(section["preset"], **overrides, seed=seed)


def _check_values(plan: Plan) -> None:
    """Rules, presets and baselines are valid; refuse before any work."""
    s = plan.stages
    if "select" in s:
        for rule in as_list(s["select"]["keep"]):
            parse_rule(str(rule))
    if "evaluate" in s:
        unknown = [b for b in as_list(s["evaluate"]["baselines"]) if b not in BASELINES]
        if unknown:
            raise UsageError(
                f"[evaluate] unknown baseline {unknown[0]!r}: use {', '.join(BASELINES)}"
            )
    if "distill" in s:
        distill_config(s["distill"], plan.seed)


def _check_wiring(plan: Plan) -> None:
    """Every stage either follows its producer or names its input; refuse before any work."""
    s = plan.stages
    need = {
        "embed": [("src", None), ("model", None)],
        "score": [("store", "embed")],
        "select": [("scores", "score")],
        "reshard": [("subset", "select"), ("src", "embed")],
        "buffer": [("data", "reshard")],
        "distill": [("data", "reshard" if "buffer" not in s else "buffer"), ("buffers", "buffer")],
        "evaluate": [("artifact", "distill"), ("test", None)],
    }
    for stage, wants in need.items():
        if stage not in s:
            continue
        for key, producer in wants:
            if not s[stage].get(key) and not (producer and producer in s):
                via = f" or include [{producer}]" if producer else ""
                raise UsageError(f"[{stage}] needs {key} = ...{via}")
