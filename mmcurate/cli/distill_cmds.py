"""`mmcurate buffer`, `mmcurate distill` and `mmcurate evaluate`: parse, call the library, print."""

from __future__ import annotations

from pathlib import Path

import click

from mmcurate.cli.common import executor_options, finish, print_summary
from mmcurate.errors import UsageError


def _device(name: str):
    from mmcurate.embed import resolve_device

    return resolve_device(name)


def _data_path(data: str) -> str:
    """A local DATA path made absolute, so artifacts can find it again; URLs stay as given."""
    return data if "://" in data or not Path(data).exists() else str(Path(data).resolve())


def _print_recalls(title: str, summary: dict, mean: float) -> None:
    click.echo(f"\n{title}")
    keys = list(summary)
    click.echo("  " + "  ".join(f"{k:>12}" for k in keys))
    click.echo(
        "  " + "  ".join(f"{summary[k]['mean']:6.2f}±{summary[k]['std']:<5.2f}" for k in keys)
    )
    click.echo(f"  mean R@K: {mean:.2f}")


@click.command("buffer")
@click.argument("data")
@click.option("--out", "out_dir", required=True, help="Directory of the expert files.")
@click.option("--experts", type=int, default=20, show_default=True, help="E experts.")
@click.option("--epochs", type=int, default=10, show_default=True, help="T epochs per expert.")
@click.option("--lr", type=float, default=0.1, show_default=True, help="Expert SGD learning rate.")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option(
    "--image-encoder",
    default="nfnet_l0",
    show_default=True,
    help="timm name (NAME@/weights.pth, NAME@random), mmc-tiny, convnet-tiny or convnet-wW-dD.",
)
@click.option("--text-encoder", default="hf-text:bert-base-uncased", show_default=True)
@click.option("--image-size", type=int, default=224, show_default=True)
@click.option("--image-root", default=None, help="Image root of a Karpathy JSON dataset.")
@click.option("--cache", "cache_dir", default=None, help="Data cache (default OUT/cache).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_path", default=None, help="Write the end summary as JSON.")
@executor_options
def buffer(
    data, out_dir, experts, epochs, lr, batch_size, image_encoder, text_encoder, image_size,
    image_root, cache_dir, device, seed, json_path, executor,
) -> None:  # fmt: skip
    """Train E expert students on DATA and save their per-epoch parameters (resumable)."""
    from mmcurate.distill.buffers import BufferConfig, make_buffers
    from mmcurate.distill.students import canonical_image_encoder

    config = BufferConfig(
        experts=experts,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        image_encoder=canonical_image_encoder(image_encoder),
        text_encoder=text_encoder,
        image_size=image_size,
        seed=seed,
    ).check()
    _device(device)  # a bad --device fails here, before any expert starts
    summary = make_buffers(
        _data_path(data),
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
            "student": f"{config.image_encoder} ({summary['n_img']} + {summary['n_txt']} "
            "parameters)",
            "out": out_dir,
        },
    )
    finish(summary, json_path)


@click.command("distill")
@click.argument("data")
@click.option("--buffers", "buffers_dir", required=True, help="Directory from `mmcurate buffer`.")
@click.option("--out", "out_path", required=True, help="The distilled artifact (.pt).")
@click.option("--preset", default="flickr-100", show_default=True, help="Published or tiny.")
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
@click.option("--warmup", type=int, default=None, help="Linear warm-up of the X, Y, S rates.")
@click.option("--image-encoder", default=None, help="Must match the buffers (default: theirs).")
@click.option("--text-encoder", default=None, help="Must match the buffers (default: theirs).")
@click.option("--image-size", type=int, default=None, help="Must match the buffers.")
@click.option("--image-root", default=None, help="Image root of a Karpathy JSON dataset.")
@click.option("--cache", "cache_dir", default=None, help="Data cache (default BUFFERS/cache).")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--save-every", type=int, default=100, show_default=True, help="Checkpoint period.")
@click.option("--resume", is_flag=True, help="Continue from OUT's checkpoint.")
@click.option("--export", "export_dir", default=None, help="Write a PNG grid and captions here.")
def distill_cmd(
    data, buffers_dir, out_path, preset, pairs, iterations, syn_steps, expert_epochs,
    max_start_epoch, mini_batch, lr_img, lr_txt, lr_lr, lr_sim, rank, alpha, loss, matching,
    warmup, image_encoder, text_encoder, image_size, image_root, cache_dir, device, seed,
    save_every, resume, export_dir,
) -> None:  # fmt: skip
    """Distil DATA into N synthetic pairs with LoRS, matching the expert buffers."""
    from mmcurate.distill.buffers import load_buffers
    from mmcurate.distill.data import load_pairs
    from mmcurate.distill.distiller import checkpoint_path, distill, export_artifact
    from mmcurate.distill.presets import resolve_config
    from mmcurate.distill.students import canonical_image_encoder

    config = resolve_config(
        preset,
        pairs=pairs,
        iterations=iterations,
        syn_steps=syn_steps,
        expert_epochs=expert_epochs,
        max_start_epoch=max_start_epoch,
        mini_batch=mini_batch,
        lr_img=lr_img,
        lr_txt=lr_txt,
        lr_lr=lr_lr,
        lr_sim=lr_sim,
        rank=rank,
        alpha=alpha,
        loss=loss,
        matching=matching,
        warmup=warmup,
        seed=seed,
    )
    if save_every < 0:
        raise UsageError("--save-every must be >= 0")
    dev = _device(device)
    expect = {
        "image_encoder": canonical_image_encoder(image_encoder) if image_encoder else None,
        "text_encoder": text_encoder,
        "image_size": image_size,
    }
    buffers = load_buffers(buffers_dir, expect)
    meta = buffers.meta
    real = load_pairs(
        _data_path(data),
        image_size=int(meta["image_size"]),
        text_encoder=str(meta["text_encoder"]),
        cache_dir=cache_dir or Path(buffers_dir) / "cache",
        image_root=image_root,
        device=device,
    )
    art = distill(
        real,
        buffers,
        config,
        device=dev,
        out=out_path,
        save_every=save_every,
        resume=resume,
        extra_config={"data": _data_path(data), "image_root": image_root},
    )
    cfg = art["config"]
    click.echo(
        f"\ndistill: {config.pairs} pairs from {real.n_pairs} real ({config.preset} preset, "
        f"{config.iterations} iterations, {cfg['seconds']:.0f}s) -> {out_path}"
    )
    loss_text = "n/a" if cfg["final_loss"] is None else f"{cfg['final_loss']:.4f}"
    click.echo(
        f"  matching loss (last 20): {loss_text}; learned lr_img {art['lr_img']:.4g}, "
        f"lr_txt {art['lr_txt']:.4g}; checkpoint {checkpoint_path(out_path)}"
    )
    if export_dir:
        info = export_artifact(art, export_dir, real)
        click.echo(
            f"  exported {info['images']} images and nearest captions (mean cosine "
            f"{info['mean_cosine']:.3f}) -> {export_dir}"
        )


@click.command("evaluate")
@click.argument("artifact")
@click.option("--test", "test_data", required=True, help="Test split (Karpathy JSON or shards).")
@click.option("--num-eval", type=int, default=5, show_default=True, help="Fresh students.")
@click.option("--epochs", type=int, default=100, show_default=True)
@click.option("--eval-momentum", type=float, default=0.9, show_default=True)
@click.option("--baseline", type=click.Choice(["random", "mtt"]), default=None)
@click.option("--train", "train_data", default=None, help="Real pairs for baselines.")
@click.option("--pairs", type=int, default=None, help="Baseline budget N (default: the file's).")
@click.option("--image-root", default=None, help="Image root of Karpathy JSON datasets.")
@click.option("--cache", "cache_dir", default=None, help="Data cache (default: beside FILE).")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_path", default=None, help="Write IR@K/TR@K mean and std as JSON.")
def evaluate_cmd(
    artifact, test_data, num_eval, epochs, eval_momentum, baseline, train_data, pairs,
    image_root, cache_dir, device, seed, json_path,
) -> None:  # fmt: skip
    """Train fresh students on a distilled file (or a baseline) and report last-epoch recall."""
    from mmcurate.data.atomic import write_json_atomic
    from mmcurate.distill.buffers import load_buffers
    from mmcurate.distill.data import load_pairs
    from mmcurate.distill.distiller import load_artifact
    from mmcurate.distill.evaluate import (
        EvalConfig,
        artifact_set,
        evaluate_small_set,
        mtt_artifact,
        random_set,
    )

    cfg_eval = EvalConfig(
        num_eval=num_eval, epochs=epochs, momentum=eval_momentum, seed=seed
    ).check()
    if pairs is not None and pairs < 1:
        raise UsageError("--pairs must be >= 1")
    dev = _device(device)
    art = load_artifact(artifact)
    cfg = art["config"]
    cache = cache_dir or Path(artifact).resolve().parent / "cache"

    def real(path: str):
        return load_pairs(
            _data_path(path),
            image_size=int(cfg["image_size"]),
            text_encoder=str(cfg["text_encoder"]),
            cache_dir=cache,
            image_root=image_root or cfg.get("image_root"),
            device=device,
        )

    test = real(test_data)
    n = pairs or int(art["images"].shape[0])
    if baseline is None:
        small, title = artifact_set(art), f"distilled ({cfg.get('method', 'lors')}, N={n})"
    else:
        train_path = train_data or cfg.get("data")
        if not train_path:
            raise UsageError(f"--baseline {baseline} needs --train DATA")
        train = real(train_path)
        if baseline == "random":
            small, title = random_set(art, train, n, seed), f"random real pairs (N={n})"
        else:
            buffers = load_buffers(cfg["buffers"])
            out = Path(artifact).with_name(Path(artifact).name.removesuffix(".pt") + f".mtt{n}.pt")
            mtt = mtt_artifact(art, train, buffers, dev, out=out, pairs=n)
            small, title = artifact_set(mtt), f"MTT-VL baseline (N={n}, saved to {out})"
    result = evaluate_small_set(small, test, cfg_eval, dev)
    _print_recalls(
        f"evaluate: {title}, {num_eval} students x {epochs} epochs, last epoch, "
        f"{test.n_images} test images / {test.n_pairs} captions",
        result["summary"],
        result["mean_recall"],
    )
    if json_path:
        write_json_atomic(json_path, result["summary"])
