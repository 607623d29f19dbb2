"""One thin body per pipeline stage: read the stage's section, call its library function, and
name its outputs. Inputs a section leaves out come from the stage before it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from mmcurate.curate.reshard import ReshardConfig, reshard
from mmcurate.curate.score_config import ScoreConfig
from mmcurate.curate.score_stage import run_score
from mmcurate.curate.select import SelectConfig, run_select
from mmcurate.distill.buffers import BufferConfig, expert_path, load_buffers, make_buffers
from mmcurate.distill.checkpoint import checkpoint_path
from mmcurate.distill.distiller import run_distill
from mmcurate.distill.evaluate import EvalConfig
from mmcurate.distill.evaluate_stage import run_evaluate
from mmcurate.distill.presets import DistillConfig, mtt_config
from mmcurate.distill.towers import check_tower_weights
from mmcurate.embed.stage import EmbedConfig, run_embed
from mmcurate.engine import Executor, run_stage
from mmcurate.errors import MmcurateError
from mmcurate.pipeline.config import Plan, as_list, build, distill_config


@dataclass
class Context:
    """What a stage body gets: the plan, its executor, and the paths of other stages."""

    plan: Plan
    executor: Executor
    progress: bool = True

    def section(self, stage: str) -> dict:
        """A stage's effective settings ({} when the config has no such stage)."""
        return self.plan.stages.get(stage, {})

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


Body = Callable[[Context], tuple[dict, list[Path]]]


def embed_stage(ctx: Context) -> tuple[dict, list[Path]]:
    """Embed the shards (and the NormSim target images, image-only) into stores."""
    c = ctx.section("embed")
    config = build(EmbedConfig, c, device=ctx.device)
    store = ctx.path("embed", "store")
    summary = {"store": run_embed(as_list(c["src"]), store, config, ctx.executor)}
    outputs = [store]
    if c["target_src"]:
        target = ctx.path("embed", "target")
        images = replace(config, modality="image", text_model=None)
        summary["target"] = run_embed(as_list(c["target_src"]), target, images, ctx.executor)
        outputs.append(target)
    summary["failed"] = {
        f"{part}/{k}": v for part, s in summary.items() for k, v in s.get("failed", {}).items()
    }
    return summary, outputs


def _store(ctx: Context) -> str:
    return ctx.section("score").get("store") or str(ctx.path("embed", "store"))


def score_stage(ctx: Context) -> tuple[dict, list[Path]]:
    """Score the store into per-stem sidecars."""
    c = ctx.section("score")
    targets = as_list(c["target"])
    if not targets and ctx.section("embed").get("target_src"):
        targets = [str(ctx.path("embed", "target"))]
    config = build(ScoreConfig, c, seed=ctx.plan.seed, device=ctx.device, target=tuple(targets))
    out = ctx.path("score")
    return run_score(_store(ctx), str(out), config, ctx.executor), [out]


def select_stage(ctx: Context) -> tuple[dict, list[Path]]:
    """Chained --keep rules over the sidecars into subset.npy + subset.json; the store is there
    for the rules that read it (NormSim-D, DataComp's caption and image-size rules)."""
    c = ctx.section("select")
    extra = {"seed": ctx.plan.seed, "store": _store(ctx)}
    if "img_key" in ctx.section("score"):
        extra["img_key"] = ctx.section("score")["img_key"]
    out = ctx.path("select", "subset.npy")
    scores = c["scores"] or str(ctx.path("score"))
    report = run_select(scores, out, build(SelectConfig, c, **extra), ctx.progress)
    return report, [out, out.with_suffix(".json")]


def reshard_stage(ctx: Context) -> tuple[dict, list[Path]]:
    """Write the subset's samples as new webdataset shards."""
    c = ctx.section("reshard")
    src = as_list(c["src"] or ctx.section("embed")["src"])
    subset = c["subset"] or str(ctx.path("select", "subset.npy"))
    out = ctx.path("reshard")
    summary = reshard(src, subset, out, build(ReshardConfig, c), ctx.executor)
    if not summary.get("shards"):
        raise MmcurateError("stage reshard: the subset matched no sample of the sources")
    return summary, [out / name for name in summary["shards"]]


def _train_data(ctx: Context, stage: str) -> str:
    """The real pairs a distillation stage trains on: its `data`, else the resharded subset."""
    for name in (stage, "buffer", "distill"):
        if ctx.section(name).get("data"):
            return ctx.section(name)["data"]
    return str(ctx.path("reshard", "*.tar"))


def buffer_stage(ctx: Context) -> tuple[dict, list[Path]]:
    """Train the expert trajectories (finished experts are kept on a resume)."""
    c = ctx.section("buffer")
    config = build(BufferConfig, c, seed=ctx.plan.seed).check()
    out = ctx.path("buffer")
    summary = make_buffers(
        _train_data(ctx, "buffer"),
        out,
        config,
        ctx.executor,
        cache_dir=ctx.cache,
        image_root=c["image_root"],
        device=ctx.device,
    )
    return summary, [expert_path(out, i) for i in range(config.experts)]


MTT_FILE = "mtt.pt"
# the buffer keys distill checks
DISTILL_PINS = ("image_encoder", "image_size", "text_encoder", "normalize", "resize")


@dataclass(frozen=True)
class DistillItem:
    """One distillation of the distill stage: `lors`, or the `mtt` baseline beside it."""

    name: str
    out: str
    export: str | None


def distill_item(common: dict, config: DistillConfig, item: DistillItem) -> dict:
    """Work item: LoRS, or MTT-VL (S fixed to I, cross-entropy) from the same settings."""
    mtt = item.name == "mtt"
    return run_distill(
        config=mtt_config(config) if mtt else config,
        out=item.out,
        export_dir=item.export,
        **{**common, "progress": common["progress"] and not mtt},
    )


def distill_stage(ctx: Context) -> tuple[dict, list[Path]]:
    """LoRS on the selected pairs; resumes from its checkpoint after an interruption. When the
    evaluate stage has the MTT baseline, MTT is distilled here too, beside LoRS on a second
    worker, and evaluate uses it."""
    c = ctx.section("distill")
    arch = ctx.section("buffer")
    out = ctx.path("distill", "distilled.pt")
    export = ctx.path("distill", "export")
    mtt = ctx.path("distill", MTT_FILE)
    buffers = c["buffers"] or ctx.path("buffer")
    expect = {k: arch[k] for k in DISTILL_PINS} if arch else None
    check_tower_weights(load_buffers(buffers, expect).meta, f"buffers in {buffers}")
    common = {
        "data": _train_data(ctx, "distill"),
        "buffers_dir": str(buffers),
        "cache_dir": ctx.cache,
        "image_root": c["image_root"],
        "device": ctx.device,
        "save_every": int(c["save_every"]),
        "resume": True,
        "expect": expect,
        "progress": ctx.progress,
    }
    items = [DistillItem("lors", str(out), str(export))]
    if "mtt" in as_list(ctx.section("evaluate").get("baselines")):
        items.append(DistillItem("mtt", str(mtt), None))
    else:
        for stale in (mtt, checkpoint_path(mtt)):
            stale.unlink(missing_ok=True)
    work = functools.partial(distill_item, common, distill_config(c, ctx.plan.seed))
    outcomes, _ = run_stage(ctx.executor, work, items, desc="distill", count_key="pairs")
    made = {o.name: o for o in outcomes}
    for failed in (o for o in outcomes if not o.ok):
        raise MmcurateError(f"stage distill: the {failed.name} distillation failed: {failed.error}")
    summary = {k: v for k, v in made["lors"].stats.items() if k != "threads"}
    if "mtt" in made:
        summary["mtt"] = str(mtt)
        return summary, [out, export / "captions.json", mtt]
    return summary, [out, export / "captions.json"]


def evaluate_stage(ctx: Context) -> tuple[dict, list[Path]]:
    """Retrieval of students trained on the distilled set and on each baseline; every student
    is one work item (finished students are kept on a resume)."""
    c = ctx.section("evaluate")
    config = EvalConfig(
        num_eval=int(c["num_eval"]),
        epochs=int(c["epochs"]),
        momentum=float(c["eval_momentum"]),
        protocol=str(c["protocol"]),
        seed=ctx.plan.seed,
    )
    sets = ["distilled", *as_list(c["baselines"])]
    out = ctx.path("evaluate")
    mtt = ctx.path("distill", MTT_FILE)  # made by the distill stage beside LoRS
    summary = run_evaluate(
        c["artifact"] or ctx.path("distill", "distilled.pt"),
        c["test"],
        config,
        ctx.executor,
        sets=sets,
        train=c["train"],
        cache_dir=ctx.cache,
        image_root=c["image_root"],
        device=ctx.device,
        out=out,
        buffers=ctx.section("distill").get("buffers") or ctx.path("buffer"),
        mtt_out=mtt if mtt.is_file() else out / MTT_FILE,
        progress=ctx.progress,
    )
    return summary, [out / f"{name}.json" for name in sets]


BODIES: dict[str, Body] = {
    "embed": embed_stage,
    "score": score_stage,
    "select": select_stage,
    "reshard": reshard_stage,
    "buffer": buffer_stage,
    "distill": distill_stage,
    "evaluate": evaluate_stage,
}
