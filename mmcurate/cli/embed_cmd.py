"""`mmcurate embed`: shards -> embedding store."""

from __future__ import annotations

import functools
import os

import click

from mmcurate.cli.common import executor_options, finish, print_summary
from mmcurate.data.shards import check_unique_stems, expand_sources
from mmcurate.data.store import is_done
from mmcurate.embed import load_encoder, resolve_device
from mmcurate.embed.stage import MODALITIES, embed_shard
from mmcurate.engine import run_stage, summarise


@click.command()
@click.argument("src", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Store directory.")
@click.option(
    "--model", required=True, help="Encoder spec, e.g. open_clip:ViT-B-32/laion2b_s34b_b79k."
)
@click.option("--modality", type=click.Choice(MODALITIES), default="both", show_default=True)
@click.option("--text-model", default=None, help="A separate text encoder spec.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option(
    "--decode-workers",
    type=int,
    default=2,
    show_default=True,
    help="DataLoader processes decoding images per shard task.",
)
@click.option("--json", "json_path", default=None, help="Write the end summary as JSON.")
@executor_options
def embed(
    src, out, model, modality, text_model, batch_size, device, decode_workers, json_path, executor
) -> None:
    """Embed webdataset shards (or image folders) into an embedding store."""
    out = os.path.abspath(out)
    urls = expand_sources(src)
    stems = check_unique_stems(urls)
    resolve_device(device)
    image_spec = model if modality != "text" else None
    text_spec = (text_model or model) if modality != "image" else None
    for spec in filter(None, (image_spec, text_spec)):
        load_encoder(spec, "cpu")
    config = {
        "model": model,
        "text_model": text_model,
        "modality": modality,
        "batch_size": batch_size,
        "device": device,
        "decode_workers": decode_workers,
        "out": out,
    }
    items = [{"name": s, "url": u} for s, u in zip(stems, urls)]
    outcomes, skipped = run_stage(
        executor,
        functools.partial(embed_shard, config),
        items,
        is_done=lambda it: is_done(out, it["name"]),
        desc="embed",
    )
    summary = summarise(outcomes, skipped)
    print_summary("mmcurate embed", summary, {"store": out, "model": model})
    finish(summary, json_path)
