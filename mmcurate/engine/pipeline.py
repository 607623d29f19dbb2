"""`mmcurate pipeline CONFIG.toml`: embed → score → select → reshard → buffer → distill → evaluate.

Each stage present in the config runs the library function its command runs. Its hash covers
its effective settings, the global seed, the hashes of the stages it reads from, and the
size and mtime of every outside file it reads. When it finishes, `<out>/<stage>.stage.json`
records that hash. On the next run a stage is skipped only when its marker holds the same
hash, its outputs exist and nothing upstream ran; otherwise it runs, and so does everything
after it. A stage resumes its own unfinished work (finished shards, experts, the distillation
checkpoint) only when `<out>/<stage>.running.json` shows it was interrupted with the same hash;
with any other hash its directory is cleared first, so no stale shard is ever reused.

Relative paths in the config (also a checkpoint after `@` in an encoder spec) are relative to
the config file's directory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

import click
import numpy as np

from mmcurate.data.atomic import write_json_atomic
from mmcurate.engine import Executor, make_executor
from mmcurate.errors import MmcurateError, UsageError

STAGES = ("embed", "score", "select", "reshard", "buffer", "distill", "evaluate")
MARKER_SUFFIX = ".stage.json"
RUNNING_SUFFIX = ".running.json"
TOP_LEVEL = {
    "out": None,
    "seed": 0,
    "device": "auto",
    "executor": "local",
    "workers": 1,
    "threads": 1,
    "ray_address": None,
    "max_failed_items": 0,
}
DEFAULTS: dict[str, dict[str, Any]] = {
    "embed": {
        "src": None,
        "model": None,
        "text_model": None,
        "batch_size": 256,
        "decode_workers": 2,
        "target_src": None,
    },
    "score": {
        "store": None,
        "metrics": [],
        "p": [],
        "target": [],
        "temperature": None,
        "batch_size": 32768,
        "k": 10,
        "window": 1_048_576,
        "img_key": "img",
        "txt_key": "txt",
        "normsim_index": "flat",
    },
    "select": {
        "scores": None,
        "keep": ["negclip:0.3", "normsim_inf:0.2"],
        "union": [],
        "intersect": [],
        "normsim_d_iters": 500,
    },
    "reshard": {"src": None, "subset": None, "shard_size": 10000},
    "buffer": {
        "data": None,
        "image_root": None,
        "experts": 20,
        "epochs": 10,
        "lr": 0.1,
        "batch_size": 128,
        "image_encoder": "nfnet_l0",
        "text_encoder": "hf-text:bert-base-uncased",
        "image_size": 224,
    },
    "distill": {
        "data": None,
        "buffers": None,
        "image_root": None,
        "preset": "flickr-100",
        "save_every": 100,
    },
    "evaluate": {
        "artifact": None,
        "train": None,
        "test": None,
        "image_root": None,
        "num_eval": 5,
        "epochs": 100,
        "eval_momentum": 0.9,
        "baselines": ["random"],
    },
}
PATH_KEYS = {
    "embed": ("src", "target_src"),
    "score": ("store", "target"),
    "select": ("scores", "union", "intersect"),
    "reshard": ("src", "subset"),
    "buffer": ("data", "image_root"),
    "distill": ("data", "buffers", "image_root"),
    "evaluate": ("artifact", "train", "test", "image_root"),
}
SPEC_KEYS = {"embed": ("model", "text_model"), "buffer": ("image_encoder",)}
BASELINES = ("random", "full", "mtt")
FULL_BASELINE_LIMIT = 20000


def _distill_keys() -> set[str]:
    from dataclasses import fields

    from mmcurate.distill.presets import DistillConfig

    return {f.name for f in fields(DistillConfig)} - {"seed", "preset"}


# ----------------------------------------------------------------------------- config


def _resolve_path(value: Any, base: Path) -> Any:
    if value is None:
        return None
    if isinstance(value, list):
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


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


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
        allowed = set(DEFAULTS[stage]) | (_distill_keys() if stage == "distill" else set())
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
    _check_wiring(plan)
    return plan


def _check_values(plan: Plan) -> None:
    """Rules, presets and baselines are valid; refuse before any work."""
    s = plan.stages
    if "select" in s:
        from mmcurate.curate.select import parse_rule

        for rule in _as_list(s["select"]["keep"]):
            parse_rule(str(rule))
    if "evaluate" in s:
        unknown = [b for b in _as_list(s["evaluate"]["baselines"]) if b not in BASELINES]
        if unknown:
            raise UsageError(
                f"[evaluate] unknown baseline {unknown[0]!r}: use {', '.join(BASELINES)}"
            )
    if "distill" in s:
        from mmcurate.distill.presets import resolve_config

        resolve_config(s["distill"]["preset"], **_distill_overrides(s["distill"], plan.seed))


def _check_wiring(plan: Plan) -> None:
    """Every stage either follows its producer or names its input; refuse before any work."""
    _check_values(plan)
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


def _distill_overrides(section: dict, seed: int) -> dict[str, Any]:
    keys = _distill_keys()
    return {**{k: v for k, v in section.items() if k in keys}, "seed": seed}


# ----------------------------------------------------------------------------- hashing


def _file_print(path: str) -> list:
    if "://" in path:
        return [path]
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file())
        digest = hashlib.sha256()
        for f in files:
            st = f.stat()
            digest.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return [str(p.resolve()), len(files), digest.hexdigest()]
    return [str(p), "missing"]


def _sources_print(sources: Sequence[str]) -> list:
    from mmcurate.data.shards import expand_sources

    return [_file_print(u) for u in expand_sources(list(sources))]


def _spec_files(*specs: str | None) -> list[str]:
    return [s.split("@", 1)[1] for s in specs if s and "@" in s and "/" in s.split("@", 1)[1]]


def external_inputs(plan: Plan, stage: str) -> list:
    """Size and mtime of every file a stage reads from outside the pipeline's own outputs."""
    c = plan.stages[stage]
    prints: list = []
    if stage == "embed":
        prints += _sources_print(_as_list(c["src"]))
        if c["target_src"]:
            prints += _sources_print(_as_list(c["target_src"]))
        prints += [_file_print(f) for f in _spec_files(c["model"], c["text_model"])]
    elif stage == "score":
        for key in ("store", "target"):
            prints += [_file_print(p) for p in _as_list(c[key])]
    elif stage == "select":
        for key in ("scores", "union", "intersect"):
            prints += [_file_print(p) for p in _as_list(c[key])]
    elif stage == "reshard":
        if c["src"]:
            prints += _sources_print(_as_list(c["src"]))
        if c["subset"]:
            prints.append(_file_print(c["subset"]))
    elif stage in ("buffer", "distill"):
        for key in ("data", "buffers"):
            if c.get(key):
                prints += (
                    _sources_print([c[key]])
                    if not str(c[key]).endswith(".json")
                    else [_file_print(c[key])]
                )
        prints += [_file_print(f) for f in _spec_files(c.get("image_encoder"))]
    elif stage == "evaluate":
        for key in ("artifact", "train", "test"):
            if c[key]:
                prints += (
                    _sources_print([c[key]])
                    if not str(c[key]).endswith(".json")
                    else [_file_print(c[key])]
                )
    return prints


def stage_hash(plan: Plan, stage: str, upstream_hashes: dict[str, str]) -> str:
    """sha256 over the stage's settings, the seed, its producers' hashes and outside inputs."""
    doc = {
        "stage": stage,
        "config": plan.stages[stage],
        "seed": plan.seed,
        "upstream": upstream_hashes,
        "inputs": external_inputs(plan, stage),
    }
    blob = json.dumps(doc, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def marker_path(out: Path, stage: str) -> Path:
    """The done marker of a stage."""
    return out / f"{stage}{MARKER_SUFFIX}"


def read_marker(out: Path, stage: str, suffix: str = MARKER_SUFFIX) -> dict | None:
    """A stage's done (or running) marker, or None when absent or unreadable."""
    try:
        data = json.loads((out / f"{stage}{suffix}").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ----------------------------------------------------------------------------- stage bodies


@dataclass
class Context:
    """What a stage body gets: the plan, its executor, and the paths of other stages."""

    plan: Plan
    executor: Executor
    progress: bool = True

    def path(self, stage: str, *parts: str) -> Path:
        """A path inside a stage's output directory."""
        return self.plan.stage_dir(stage).joinpath(*parts)

    @property
    def device(self) -> str:
        """The configured device (auto, cpu, cuda)."""
        return str(self.plan.settings["device"])

    @property
    def cache(self) -> Path:
        """The shared cache of decoded images and encoded captions of buffer/distill/evaluate."""
        return self.plan.out / "cache"


def _check_failures(stage: str, summary: dict, plan: Plan) -> None:
    failed = summary.get("failed") or {}
    if len(failed) > int(plan.settings["max_failed_items"]):
        name, reason = next(iter(sorted(failed.items())))
        raise MmcurateError(
            f"stage {stage}: {len(failed)} item(s) failed (first: {name}: {reason}); fix or "
            "remove them and re-run (finished items are kept), or raise max_failed_items"
        )


def _embed_into(ctx: Context, sources: list[str], out: Path, modality: str) -> dict:
    import functools

    from mmcurate.data.shards import check_unique_stems, expand_sources
    from mmcurate.data.store import is_done
    from mmcurate.embed import load_encoder
    from mmcurate.embed.stage import embed_shard
    from mmcurate.engine import run_stage, summarise

    c = ctx.plan.stages["embed"]
    urls = expand_sources(sources)
    stems = check_unique_stems(urls)
    load_encoder(c["model"], "cpu")
    if c["text_model"] and modality != "image":
        load_encoder(c["text_model"], "cpu")
    config = {
        "model": c["model"],
        "text_model": c["text_model"] if modality != "image" else None,
        "modality": modality,
        "batch_size": int(c["batch_size"]),
        "device": ctx.device,
        "decode_workers": int(c["decode_workers"]),
        "out": str(out),
    }
    items = [{"name": s, "url": u} for s, u in zip(stems, urls)]
    outcomes, skipped = run_stage(
        ctx.executor,
        functools.partial(embed_shard, config),
        items,
        is_done=lambda it: is_done(out, it["name"]),
        desc=f"embed {out.name}",
    )
    return summarise(outcomes, skipped)


def run_embed(ctx: Context) -> tuple[dict, list[Path]]:
    """Embed the shards (and the NormSim target images, image-only) into stores."""
    c = ctx.plan.stages["embed"]
    store = ctx.path("embed", "store")
    summary = {"store": _embed_into(ctx, _as_list(c["src"]), store, "both")}
    outputs = [store]
    if c["target_src"]:
        target = ctx.path("embed", "target")
        summary["target"] = _embed_into(ctx, _as_list(c["target_src"]), target, "image")
        outputs.append(target)
    summary["failed"] = {
        f"{part}/{k}": v for part, s in summary.items() for k, v in s.get("failed", {}).items()
    }
    return summary, outputs


def score_store(ctx: Context) -> str:
    """The embedding store the score stage reads."""
    c = ctx.plan.stages["score"]
    return c["store"] or str(ctx.path("embed", "store"))


def score_targets(ctx: Context) -> list[str]:
    """NormSim targets: the configured ones, else the embed stage's target store."""
    c = ctx.plan.stages["score"]
    if c["target"]:
        return _as_list(c["target"])
    embed = ctx.plan.stages.get("embed")
    return [str(ctx.path("embed", "target"))] if embed and embed["target_src"] else []


def run_score(ctx: Context) -> tuple[dict, list[Path]]:
    """Score the store into per-stem sidecars (the library of `mmcurate score`)."""
    from mmcurate.curate.score_stage import make_config
    from mmcurate.curate.score_stage import run_score as score_library

    c = ctx.plan.stages["score"]
    out = ctx.path("score")
    cfg = make_config(
        score_store(ctx),
        str(out),
        metrics=_as_list(c["metrics"]),
        ps=[str(p) for p in _as_list(c["p"])],
        targets=score_targets(ctx),
        temperature=c["temperature"],
        batch_size=int(c["batch_size"]),
        k=int(c["k"]),
        window=int(c["window"]),
        seed=ctx.plan.seed,
        img_key=c["img_key"],
        txt_key=c["txt_key"],
        normsim_index=c["normsim_index"],
        device=ctx.device,
    )
    return score_library(cfg, ctx.executor), [out]


def run_select(ctx: Context) -> tuple[dict, list[Path]]:
    """Chained --keep rules over the sidecars into subset.npy + subset.json."""
    from mmcurate.curate.select import select, write_subset

    c = ctx.plan.stages["select"]
    scores = c["scores"] or str(ctx.path("score"))
    needs_store = any(str(r).startswith("normsim_d") for r in _as_list(c["keep"]))
    store = None
    if needs_store:
        store = ctx.plan.stages.get("score", {}).get("store") or str(ctx.path("embed", "store"))
    img_key = ctx.plan.stages.get("score", {}).get("img_key", "img")
    subset, report = select(
        scores,
        _as_list(c["keep"]),
        union=_as_list(c["union"]),
        intersect=_as_list(c["intersect"]),
        store=store,
        img_key=img_key,
        normsim_d_iters=int(c["normsim_d_iters"]),
        seed=ctx.plan.seed,
        progress=ctx.progress,
    )
    out = ctx.path("select", "subset.npy")
    record = write_subset(out, subset, report)
    return report, [out, record]


def subset_path(ctx: Context) -> str:
    """The subset file the reshard stage applies."""
    return ctx.plan.stages["reshard"]["subset"] or str(ctx.path("select", "subset.npy"))


def run_reshard(ctx: Context) -> tuple[dict, list[Path]]:
    """Write the subset's samples as new webdataset shards."""
    from mmcurate.curate.reshard import reshard

    c = ctx.plan.stages["reshard"]
    src = _as_list(c["src"] or ctx.plan.stages["embed"]["src"])
    out = ctx.path("reshard")
    summary = reshard(src, subset_path(ctx), out, int(c["shard_size"]), ctx.executor)
    if not summary.get("shards"):
        raise MmcurateError("stage reshard: the subset matched no sample of the sources")
    return summary, [out / name for name in summary["shards"]]


def train_data(ctx: Context, stage: str) -> str:
    """The real pairs a distillation stage trains on: its `data`, else the resharded subset."""
    configured = ctx.plan.stages[stage].get("data")
    if configured:
        return configured
    for producer in ("buffer", "distill"):
        if producer in ctx.plan.stages and ctx.plan.stages[producer].get("data"):
            return ctx.plan.stages[producer]["data"]
    return str(ctx.path("reshard", "*.tar"))


def buffer_config(ctx: Context):
    """The BufferConfig of the buffer stage."""
    from mmcurate.distill.buffers import BufferConfig

    c = ctx.plan.stages["buffer"]
    return BufferConfig(
        experts=int(c["experts"]),
        epochs=int(c["epochs"]),
        lr=float(c["lr"]),
        batch_size=int(c["batch_size"]),
        image_encoder=str(c["image_encoder"]),
        text_encoder=str(c["text_encoder"]),
        image_size=int(c["image_size"]),
        seed=ctx.plan.seed,
    ).check()


def run_buffer(ctx: Context) -> tuple[dict, list[Path]]:
    """Train the expert trajectories (finished experts are kept on a resume)."""
    from mmcurate.distill.buffers import expert_path, make_buffers

    config = buffer_config(ctx)
    out = ctx.path("buffer")
    summary = make_buffers(
        train_data(ctx, "buffer"),
        out,
        config,
        ctx.executor,
        cache_dir=ctx.cache,
        image_root=ctx.plan.stages["buffer"]["image_root"],
        device=ctx.device,
    )
    return summary, [expert_path(out, i) for i in range(config.experts)]


def _student_arch(ctx: Context) -> dict:
    """Image size and text encoder of the students (from the buffer stage or the buffers)."""
    if "buffer" in ctx.plan.stages:
        c = ctx.plan.stages["buffer"]
        return {"image_size": int(c["image_size"]), "text_encoder": str(c["text_encoder"])}
    from mmcurate.distill.buffers import load_buffers

    meta = load_buffers(ctx.plan.stages["distill"]["buffers"]).meta
    return {"image_size": int(meta["image_size"]), "text_encoder": str(meta["text_encoder"])}


def artifact_path(ctx: Context) -> Path:
    """Where the distill stage writes its artifact."""
    return ctx.path("distill", "distilled.pt")


def run_distill(ctx: Context) -> tuple[dict, list[Path]]:
    """LoRS on the selected pairs; resumes from its checkpoint after an interruption."""
    from mmcurate.distill.buffers import load_buffers
    from mmcurate.distill.data import load_pairs
    from mmcurate.distill.distiller import distill as distill_library
    from mmcurate.distill.distiller import export_artifact
    from mmcurate.distill.presets import resolve_config
    from mmcurate.embed import resolve_device

    c = ctx.plan.stages["distill"]
    arch = _student_arch(ctx)
    data = train_data(ctx, "distill")
    pairs = load_pairs(
        data,
        image_size=arch["image_size"],
        text_encoder=arch["text_encoder"],
        cache_dir=ctx.cache,
        image_root=c["image_root"],
        device=ctx.device,
    )
    buffers = load_buffers(c["buffers"] or ctx.path("buffer"), expect=arch)
    config = resolve_config(c["preset"], **_distill_overrides(c, ctx.plan.seed))
    out = artifact_path(ctx)
    art = distill_library(
        pairs,
        buffers,
        config,
        device=resolve_device(ctx.device),
        out=out,
        save_every=int(c["save_every"]),
        resume=True,
        progress=ctx.progress,
        extra_config={"data": data},
    )
    export = export_artifact(art, ctx.path("distill", "export"), pairs)
    summary = {
        "pairs": int(art["images"].shape[0]),
        "iterations": config.iterations,
        "lr_img": art["lr_img"],
        "lr_txt": art["lr_txt"],
        "final_loss": art["config"].get("final_loss"),
        "export": export,
    }
    return summary, [out, ctx.path("distill", "export", "captions.json")]


def _eval_set(config: dict, name: str):
    """The training set of one evaluation: the distilled artifact or a baseline (and its N)."""
    import torch

    from mmcurate.distill.data import load_pairs
    from mmcurate.distill.distiller import load_artifact
    from mmcurate.distill.evaluate import SmallSet, artifact_set, random_set
    from mmcurate.distill.students import normalize_images

    art = load_artifact(config["mtt_out"] if name == "mtt" else config["artifact"])
    n = int(art["images"].shape[0])
    if name in ("distilled", "mtt"):
        return artifact_set(art), n
    train = load_pairs(config["train"], **config["load"])
    if name == "random":
        return random_set(art, train, n, config["seed"]), n
    cfg = art["config"]
    lr = float(cfg.get("expert_lr", 0.1))
    full = SmallSet(
        images=normalize_images(train.pixels(np.arange(train.n_pairs)), cfg["mean"], cfg["std"]),
        texts=train.texts.float(),
        similarity=torch.eye(train.n_pairs),
        lr_img=lr,
        lr_txt=lr,
        loss="ce",
        arch=artifact_set(art).arch,
    )
    return full, train.n_pairs


def student_path(out: Path, name: str, k: int) -> Path:
    """Where evaluation student k of a set writes its recall."""
    return out / f"{name}.student{k}.json"


def evaluate_student(config: dict, item: dict) -> dict:
    """Work item: train evaluation student k of one set and write its last-epoch recall.

    Student k gets the seed `evaluate_small_set` gives its k-th student, so a set's students
    spread over workers give exactly what `mmcurate evaluate` gives in one process.
    """
    from mmcurate.distill.buffers import derive_seed
    from mmcurate.distill.data import load_pairs
    from mmcurate.distill.evaluate import EvalConfig, embed_test, train_student
    from mmcurate.distill.students import build_student
    from mmcurate.embed import resolve_device
    from mmcurate.metrics.retrieval import retrieval_recall

    small, pairs = _eval_set(config, item["set"])
    test = load_pairs(config["test"], **config["load"])
    eval_cfg = EvalConfig(**config["eval"])
    device = resolve_device(config["device"])
    arch = small.arch
    seed = derive_seed(eval_cfg.seed, 1000 + int(item["student"]))
    student = build_student(
        arch["image_encoder"], arch["text_dim"], arch["image_size"], seed, device
    )
    train_student(student, small, eval_cfg, seed, device)
    img, txt = embed_test(student, test, arch["mean"], arch["std"], device)
    recall = retrieval_recall(img, txt, test.image_index)
    write_json_atomic(
        student_path(Path(config["out"]), item["set"], int(item["student"])),
        {"recall": recall, "pairs": pairs},
    )
    return {"rows": 1, "pairs": pairs}


def collect_set(out: Path, name: str, num_eval: int) -> dict:
    """A set's students as `mmcurate evaluate` reports them: R@K mean ± std, runs, mean R@K."""
    from mmcurate.metrics.retrieval import mean_recall, summarize_runs

    students = [json.loads(student_path(out, name, k).read_text()) for k in range(num_eval)]
    runs = [s["recall"] for s in students]
    return {
        **summarize_runs(runs),
        "pairs": students[0]["pairs"],
        "runs": runs,
        "mean_recall": float(np.mean([mean_recall(r) for r in runs])),
    }


def run_evaluate(ctx: Context) -> tuple[dict, list[Path]]:
    """Retrieval of students trained on the distilled set and on each baseline; every student
    is one work item (finished students are kept on a resume)."""
    import functools

    from mmcurate.distill.data import load_pairs
    from mmcurate.distill.distiller import load_artifact
    from mmcurate.distill.evaluate import EvalConfig
    from mmcurate.engine import run_stage, summarise

    c = ctx.plan.stages["evaluate"]
    artifact = str(c["artifact"] or artifact_path(ctx))
    art = load_artifact(artifact)
    cfg = art["config"]
    load = {
        "image_size": int(cfg["image_size"]),
        "text_encoder": str(cfg["text_encoder"]),
        "cache_dir": str(ctx.cache),
        "image_root": c["image_root"],
        "device": ctx.device,
    }
    eval_cfg = EvalConfig(
        num_eval=int(c["num_eval"]),
        epochs=int(c["epochs"]),
        momentum=float(c["eval_momentum"]),
        seed=ctx.plan.seed,
    ).check()
    test = load_pairs(c["test"], **load)
    if test.image_size != int(cfg["image_size"]) or test.text_dim != int(cfg["text_dim"]):
        raise UsageError(
            f"[evaluate] test data has {test.image_size} px images and {test.text_dim}-d "
            f"texts; the distilled set needs {cfg['image_size']} px and {cfg['text_dim']}-d"
        )
    baselines = _as_list(c["baselines"])
    train = c["train"] or cfg.get("data") or train_data(ctx, "evaluate")
    out = ctx.path("evaluate")
    mtt_out = out / "mtt.pt"
    if baselines:
        pairs = load_pairs(train, **load)
        if "full" in baselines and pairs.n_pairs > FULL_BASELINE_LIMIT:
            raise UsageError(
                f"[evaluate] the full baseline trains with an N×N target matrix; "
                f"{pairs.n_pairs} pairs exceed {FULL_BASELINE_LIMIT} (drop 'full')"
            )
        if "mtt" in baselines:
            from mmcurate.distill.buffers import load_buffers
            from mmcurate.distill.evaluate import mtt_artifact
            from mmcurate.embed import resolve_device

            buffers = ctx.plan.stages.get("distill", {}).get("buffers") or ctx.path("buffer")
            mtt_artifact(
                art,
                pairs,
                load_buffers(buffers),
                resolve_device(ctx.device),
                mtt_out,
                ctx.progress,
            )
    config = {
        "artifact": artifact,
        "mtt_out": str(mtt_out),
        "train": train,
        "test": c["test"],
        "load": load,
        "eval": {k: getattr(eval_cfg, k) for k in ("num_eval", "epochs", "momentum", "seed")},
        "seed": ctx.plan.seed,
        "device": ctx.device,
        "out": str(out),
    }
    names = ["distilled", *baselines]
    items = [
        {"name": f"{name}#{k}", "set": name, "student": k}
        for name in sorted(names, key=lambda n: n != "full")
        for k in range(eval_cfg.num_eval)
    ]
    outcomes, skipped = run_stage(
        ctx.executor,
        functools.partial(evaluate_student, config),
        items,
        is_done=lambda it: student_path(out, it["set"], it["student"]).is_file(),
        desc="evaluate students",
        count_key="rows",
    )
    summary = summarise(outcomes, skipped)
    results = {}
    if not summary["failed"]:
        for name in names:
            results[name] = collect_set(out, name, eval_cfg.num_eval)
            write_json_atomic(out / f"{name}.json", results[name])
    summary.update({"results": results, "test": c["test"], "num_eval": eval_cfg.num_eval})
    return summary, [out / f"{name}.json" for name in names]


BODIES: dict[str, Callable[[Context], tuple[dict, list[Path]]]] = {
    "embed": run_embed,
    "score": run_score,
    "select": run_select,
    "reshard": run_reshard,
    "buffer": run_buffer,
    "distill": run_distill,
    "evaluate": run_evaluate,
}


# ----------------------------------------------------------------------------- the runner


def _compact(value: Any, limit: int = 20) -> Any:
    """A summary small enough for a marker: long lists become their length."""
    if isinstance(value, dict):
        return {str(k): _compact(v, limit) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return len(value) if len(value) > limit else [_compact(v, limit) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _stage_range(plan: Plan, start: str | None, until: str | None) -> list[str]:
    present = [s for s in STAGES if s in plan.stages]
    for name, flag in ((start, "--from"), (until, "--until")):
        if name is not None and name not in present:
            raise UsageError(f"{flag} {name}: not a stage of this config ({', '.join(present)})")
    lo = present.index(start) if start else 0
    hi = present.index(until) if until else len(present) - 1
    if lo > hi:
        raise UsageError(f"--from {start} comes after --until {until}")
    return present[: hi + 1]


def _clear(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run_pipeline(
    plan: Plan,
    *,
    start: str | None = None,
    until: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = click.echo,
) -> dict[str, Any]:
    """Run the plan's stages in order; returns {stage: {"status", "hash", "summary", ...}}."""
    stages = _stage_range(plan, start, until)
    s = plan.settings
    executor = make_executor(s["executor"], int(s["workers"]), int(s["threads"]), s["ray_address"])
    ctx = Context(plan, executor, progress)
    plan.out.mkdir(parents=True, exist_ok=True)
    hashes: dict[str, str] = {}
    report: dict[str, Any] = {}
    ran_upstream = False
    forced = False
    for stage in stages:
        producers = [p for p in STAGES[: STAGES.index(stage)] if p in hashes]
        h = stage_hash(plan, stage, {p: hashes[p] for p in producers})
        hashes[stage] = h
        forced = forced or stage == start
        marker = read_marker(plan.out, stage)
        outputs_ok = bool(marker) and all(Path(p).exists() for p in marker.get("outputs", []))
        valid = bool(marker) and marker.get("hash") == h and outputs_ok
        if start and not forced:
            if not valid:
                raise UsageError(
                    f"--from {start}: stage {stage} has not finished with this config; "
                    f"run without --from (or --from {stage})"
                )
            report[stage] = {"status": "skipped", "hash": h, "summary": marker.get("summary")}
            echo(f"== {stage}: done earlier, skipped ({h[:12]})")
            continue
        if valid and not ran_upstream and not forced:
            report[stage] = {"status": "skipped", "hash": h, "summary": marker.get("summary")}
            echo(f"== {stage}: done earlier, skipped ({h[:12]})")
            continue
        running = read_marker(plan.out, stage, RUNNING_SUFFIX)
        resume = bool(running) and running.get("hash") == h and not ran_upstream
        resume = resume and not (forced and stage == start)
        marker_path(plan.out, stage).unlink(missing_ok=True)
        if not resume:
            _clear(plan.stage_dir(stage))
        write_json_atomic(plan.out / f"{stage}{RUNNING_SUFFIX}", {"stage": stage, "hash": h})
        echo(f"== {stage}: {'resuming' if resume else 'running'} ({h[:12]})")
        began = time.perf_counter()
        summary, outputs = BODIES[stage](ctx)
        _check_failures(stage, summary, plan)
        seconds = round(time.perf_counter() - began, 3)
        write_json_atomic(
            marker_path(plan.out, stage),
            {
                "stage": stage,
                "hash": h,
                "config": _compact(plan.stages[stage]),
                "upstream": {p: hashes[p] for p in producers},
                "outputs": [str(p) for p in outputs],
                "seconds": seconds,
                "resumed": resume,
                "summary": _compact(summary),
            },
        )
        (plan.out / f"{stage}{RUNNING_SUFFIX}").unlink(missing_ok=True)
        ran_upstream = True
        report[stage] = {
            "status": "resumed" if resume else "ran",
            "hash": h,
            "summary": summary,
            "seconds": seconds,
        }
        echo(f"   {stage} finished in {seconds:.1f} s")
    return report
