"""One thin body per pipeline stage: read the stage's section, call its library function, and
name its outputs. Inputs a section leaves out come from the stage before it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from mmcurate.curate.reshard import ReshardConfig, reshard
from mmcurate.curate.score_config import ScoreConfig
from mmcurate.curate.score_stage import run_score
from mmcurate.curate.select import SelectConfig, run_select
from mmcurate.distill.buffers import BufferConfig, expert_path, make_buffers
from mmcurate.distill.distiller import run_distill
from mmcurate.distill.evaluate import EvalConfig
from mmcurate.distill.evaluate_stage import run_evaluate
from mmcurate.embed.stage import EmbedConfig, run_embed
from mmcurate.engine import Executor
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


# the buffer keys distill checks
DISTILL_PINS = ("image_encoder", "image_size", "text_encoder", "normalize", "resize")


def distill_stage(ctx: Context) -> tuple[dict, list[Path]]:
    """LoRS on the selected pairs; resumes from its checkpoint after an interruption."""
    c = ctx.section("distill")
    arch = ctx.section("buffer")
    out = ctx.path("distill", "distilled.pt")
    export = ctx.path("distill", "export")
    summary = run_distill(
        _train_data(ctx, "distill"),
        c["buffers"] or ctx.path("buffer"),
        out,
        distill_config(c, ctx.plan.seed),
        cache_dir=ctx.cache,
        image_root=c["image_root"],
        device=ctx.device,
        save_every=int(c["save_every"]),
        resume=True,
        export_dir=export,
        expect={k: arch[k] for k in DISTILL_PINS} if arch else None,
        progress=ctx.progress,
    )
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
        mtt_out=out / "mtt.pt",
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
