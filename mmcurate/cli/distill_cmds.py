"""`mmcurate buffer`, `mmcurate distill` and `mmcurate evaluate`: parse, call the library, print."""

from __future__ import annotations

from pathlib import Path

import click

from mmcurate.cli.common import default, executor_options, finish, print_summary
from mmcurate.distill.augment import NORMALIZATIONS, RESIZE_MODES
from mmcurate.distill.buffers import BufferConfig
from mmcurate.distill.distiller import SAVE_EVERY
from mmcurate.distill.evaluate import EvalConfig
from mmcurate.distill.presets import DistillConfig
from mmcurate.embed import DEFAULT_DEVICE as DEVICE
from mmcurate.metrics.retrieval import RECALL_KEYS


def _print_recalls(title: str, summary: dict, mean: float) -> None:
    click.echo(f"\n{title}")
    keys = [k for k in RECALL_KEYS if k in summary]
    click.echo("  " + "  ".join(f"{k:>12}" for k in keys))
    click.echo(
        "  " + "  ".join(f"{summary[k]['mean']:6.2f}±{summary[k]['std']:<5.2f}" for k in keys)
    )
    click.echo(f"  mean R@K: {mean:.2f}")


@click.command("buffer")
@click.argument("data")
@click.option("--out", "out_dir", required=True, help="Directory of the expert files.")
@click.option(
    "--experts",
    type=int,
    default=default(BufferConfig, "experts"),
    show_default=True,
    help="E experts.",
)
@click.option(
    "--epochs",
    type=int,
    default=default(BufferConfig, "epochs"),
    show_default=True,
    help="T epochs per expert.",
)
@click.option(
    "--lr",
    type=float,
    default=default(BufferConfig, "lr"),
    show_default=True,
    help="Expert SGD learning rate.",
)
@click.option(
    "--batch-size", type=int, default=default(BufferConfig, "batch_size"), show_default=True
)
@click.option(
    "--image-encoder",
    default=default(BufferConfig, "image_encoder"),
    show_default=True,
    help="Trainable image tower: a timm name (pretrained; NAME@/weights.pth, NAME@random), "
    "open_clip:ARCH[/tag][@ckpt] (its visual tower), mmc-tiny, convnet-tiny or convnet-wW-dD.",
)
@click.option(
    "--text-encoder",
    default=default(BufferConfig, "text_encoder"),
    show_default=True,
    help="Frozen text tower: hf-text:NAME or open_clip:ARCH[/tag][@ckpt] (@random: untrained).",
)
@click.option(
    "--image-size", type=int, default=default(BufferConfig, "image_size"), show_default=True
)
@click.option(
    "--augment/--no-augment",
    default=default(BufferConfig, "augment"),
    help="The reference's training augmentation (RandomResizedCrop 0.5-1, flip, RandAugment); "
    "--no-augment trains on the plain images (normalisation and resize stay as set).",
)
@click.option(
    "--normalize",
    type=click.Choice(list(NORMALIZATIONS)),
    default=default(BufferConfig, "normalize"),
    show_default=True,
    help="Image mean/std: CLIP's (the reference's) or ImageNet's.",
)
@click.option(
    "--resize",
    type=click.Choice(list(RESIZE_MODES)),
    default=default(BufferConfig, "resize"),
    show_default=True,
    help="squash to a square (the reference's) or shorter side + centre crop.",
)
@click.option("--image-root", default=None, help="Image root of a Karpathy JSON dataset.")
@click.option("--cache", "cache_dir", default=None, help="Data cache (default OUT/cache).")
@click.option("--device", default=DEVICE, show_default=True, help="auto, cpu or cuda.")
@click.option("--seed", type=int, default=default(BufferConfig, "seed"), show_default=True)
@click.option("--json", "json_path", default=None, help="Write the end summary as JSON.")
@executor_options
def buffer(
    data, out_dir, image_root, cache_dir, device, json_path, executor, **options
) -> None:  # fmt: skip
    """Train E expert students on DATA and save their per-epoch parameters (resumable)."""
    from mmcurate.distill.buffers import make_buffers
    from mmcurate.embed import resolve_device

    config = BufferConfig(**options).check()
    resolve_device(device)
    summary = make_buffers(
        data,
        out_dir,
        config,
        executor,
        cache_dir=cache_dir,
        image_root=image_root,
        device=device,
    )
    print_summary(
        "buffer (experts)",
        summary,
        {
            "data": f"{summary['pairs']} pairs, {summary['images']} images",
            "student": f"{summary['image_encoder']} ({summary['n_img']} + {summary['n_txt']} "
            "parameters)",
            "images": f"{'augmented, ' if config.augment else ''}{config.normalize} mean/std, "
            f"{config.resize} resize, full batches only",
            "out": out_dir,
        },
    )
    finish(summary, json_path)


@click.command("distill")
@click.argument("data")
@click.option("--buffers", "buffers_dir", required=True, help="Directory from `mmcurate buffer`.")
@click.option("--out", "out_path", required=True, help="The distilled artifact (.pt).")
@click.option(
    "--preset",
    default=default(DistillConfig, "preset"),
    show_default=True,
    help="Published or tiny.",
)
@click.option("--pairs", type=int, default=None, help="N distilled pairs.")
@click.option("--iterations", type=int, default=None)
@click.option("--syn-steps", type=int, default=None)
@click.option("--expert-epochs", type=int, default=None)
@click.option("--max-start-epoch", type=int, default=None)
@click.option("--mini-batch", type=int, default=None)
@click.option("--lr-img", type=float, default=None)
@click.option("--lr-txt", type=float, default=None)
@click.option("--lr-lr", type=float, default=None)
@click.option("--lr-sim", type=float, default=None)
@click.option("--rank", default=None, help="Rank r of S, or 'full' for a full matrix.")
@click.option("--alpha", type=float, default=None)
@click.option("--loss", type=click.Choice(["wbce", "infonce", "bce", "mse"]), default=None)
@click.option("--matching", type=click.Choice(["tesla", "full"]), default=None)
@click.option(
    "--merge-loss-branches/--no-merge-loss-branches",
    default=None,
    help="X, Y, S gradients from one ratio over both modalities (the reference's COCO runs).",
)
@click.option("--temperature", type=float, default=None, help="Student temperature.")
@click.option(
    "--init",
    type=click.Choice(["random", "distinct"]),
    default=None,
    help="Initial pairs: random real pairs (the reference's) or distinct images.",
)
@click.option(
    "--augment/--no-augment",
    default=None,
    help="Augment the initial images as the experts' (the reference's; off in coco-500).",
)
@click.option("--warmup", type=int, default=None, help="Linear warm-up of the X, Y, S rates.")
@click.option(
    "--eta-param",
    type=click.Choice(["linear", "log"]),
    default=None,
    help="Learn the step sizes as η (the reference's) or as log η, which keeps η > 0.",
)
@click.option("--seed", type=int, default=None)
@click.option("--image-encoder", default=None, help="Must match the buffers (default: theirs).")
@click.option("--text-encoder", default=None, help="Must match the buffers (default: theirs).")
@click.option("--image-size", type=int, default=None, help="Must match the buffers.")
@click.option(
    "--normalize",
    type=click.Choice(list(NORMALIZATIONS)),
    default=None,
    help="Must match the buffers' image normalisation (default: theirs).",
)
@click.option(
    "--resize",
    type=click.Choice(list(RESIZE_MODES)),
    default=None,
    help="Must match the buffers' resize mode (default: theirs).",
)
@click.option("--image-root", default=None, help="Image root of a Karpathy JSON dataset.")
@click.option("--cache", "cache_dir", default=None, help="Data cache (default BUFFERS/cache).")
@click.option("--device", default=DEVICE, show_default=True)
@click.option(
    "--save-every", type=int, default=SAVE_EVERY, show_default=True, help="Checkpoint period."
)
@click.option("--resume", is_flag=True, help="Continue from OUT's checkpoint.")
@click.option("--export", "export_dir", default=None, help="Write a PNG grid and captions here.")
def distill_cmd(
    data, buffers_dir, out_path, preset, image_encoder, text_encoder, image_size, normalize,
    resize, image_root, cache_dir, device, save_every, resume, export_dir, **overrides,
) -> None:  # fmt: skip
    """Distil DATA into N synthetic pairs with LoRS, matching the expert buffers."""
    from mmcurate.distill.distiller import run_distill
    from mmcurate.distill.presets import resolve_config

    expect = {
        "image_encoder": image_encoder,
        "text_encoder": text_encoder,
        "image_size": image_size,
        "normalize": normalize,
        "resize": resize,
    }
    summary = run_distill(
        data,
        buffers_dir,
        out_path,
        resolve_config(preset, **overrides),
        cache_dir=cache_dir or Path(buffers_dir) / "cache",
        image_root=image_root,
        device=device,
        save_every=save_every,
        resume=resume,
        export_dir=export_dir,
        expect=expect,
    )
    click.echo(
        f"\ndistill: {summary['pairs']} pairs from {summary['real_pairs']} real "
        f"({summary['preset']} preset, {summary['iterations']} iterations, "
        f"{summary['seconds']:.0f}s) -> {out_path}"
    )
    loss = summary["final_loss"]
    click.echo(
        f"  matching loss (last 20): {'n/a' if loss is None else f'{loss:.4f}'}; learned lr_img "
        f"{summary['lr_img']:.4g}, lr_txt {summary['lr_txt']:.4g}; checkpoint "
        f"{summary['checkpoint']}"
    )
    info = summary["export"]
    if info:
        click.echo(
            f"  exported {info['images']} images and nearest captions (mean cosine "
            f"{info['mean_cosine']:.3f}) -> {export_dir}"
        )


@click.command("evaluate")
@click.argument("artifact")
@click.option("--test", "test_data", required=True, help="Test split (Karpathy JSON or shards).")
@click.option(
    "--num-eval",
    type=int,
    default=default(EvalConfig, "num_eval"),
    show_default=True,
    help="Fresh students.",
)
@click.option("--epochs", type=int, default=default(EvalConfig, "epochs"), show_default=True)
@click.option(
    "--eval-momentum", type=float, default=default(EvalConfig, "momentum"), show_default=True
)
@click.option(
    "--protocol",
    type=click.Choice(["last", "paper"]),
    default=default(EvalConfig, "protocol"),
    show_default=True,
    help="paper: the reference's 101 epochs with test scores every 10; adds best_on_test.",
)
@click.option("--baseline", type=click.Choice(["random", "mtt"]), default=None)
@click.option("--train", "train_data", default=None, help="Real pairs for baselines.")
@click.option("--pairs", type=int, default=None, help="Baseline budget N (default: the file's).")
@click.option("--image-root", default=None, help="Image root of Karpathy JSON datasets.")
@click.option("--cache", "cache_dir", default=None, help="Data cache (default: beside FILE).")
@click.option("--device", default=DEVICE, show_default=True)
@click.option("--seed", type=int, default=default(EvalConfig, "seed"), show_default=True)
@click.option("--json", "json_path", default=None, help="Write IR@K/TR@K mean and std as JSON.")
@executor_options
def evaluate_cmd(
    artifact, test_data, num_eval, epochs, eval_momentum, protocol, baseline, train_data, pairs,
    image_root, cache_dir, device, seed, json_path, executor,
) -> None:  # fmt: skip
    """Train fresh students on a distilled file (or a baseline) and report last-epoch recall."""
    from mmcurate.data.atomic import write_json_atomic
    from mmcurate.distill.evaluate_stage import run_evaluate

    name = baseline or "distilled"
    config = EvalConfig(
        num_eval=num_eval, epochs=epochs, momentum=eval_momentum, protocol=protocol, seed=seed
    )
    summary = run_evaluate(
        artifact,
        test_data,
        config,
        executor,
        sets=[name],
        train=train_data,
        pairs=pairs,
        cache_dir=cache_dir or Path(artifact).resolve().parent / "cache",
        image_root=image_root,
        device=device,
    )
    if summary["failed"]:
        print_summary("mmcurate evaluate", summary)
        finish(summary, None)
    result = summary["results"][name]
    n = summary["pairs"]
    title = {
        "distilled": f"distilled ({summary['method']}, N={n})",
        "random": f"random real pairs (N={n})",
        "mtt": f"MTT-VL baseline (N={n}, saved to {summary['mtt']})",
    }[name]
    trained = f"{epochs + 1} epochs (paper protocol)" if protocol == "paper" else f"{epochs} epochs"
    _print_recalls(
        f"evaluate: {title}, {num_eval} students x {trained}, last epoch, "
        f"{summary['test_images']} test images / {summary['test_pairs']} captions",
        result,
        result["mean_recall"],
    )
    best = result.get("best_on_test")
    if best:
        _print_recalls(
            "best epoch per student, SELECTED ON THE TEST DATA (the reference's protocol): for "
            "comparison with published tables only, not an estimate of performance",
            best,
            best["mean_recall"],
        )
    if json_path:
        figures = {k: v for k, v in result.items() if k in RECALL_KEYS}
        if best:
            figures["best_on_test"] = {k: best[k] for k in RECALL_KEYS}
        write_json_atomic(json_path, figures)
