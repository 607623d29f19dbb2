"""`mmcurate embed`: shards -> embedding store."""

from __future__ import annotations

import os

import click

from mmcurate.cli.common import counts_line, default, executor_options, finish, print_summary
from mmcurate.embed.decode import DECODERS
from mmcurate.embed.stage import MODALITIES, EmbedConfig, run_embed


@click.command()
@click.argument("src", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Store directory.")
@click.option(
    "--model", required=True, help="Encoder spec, e.g. open_clip:ViT-B-32/laion2b_s34b_b79k."
)
@click.option(
    "--modality",
    type=click.Choice(MODALITIES),
    default=default(EmbedConfig, "modality"),
    show_default=True,
)
@click.option("--text-model", default=None, help="A separate text encoder spec.")
@click.option(
    "--batch-size", type=int, default=default(EmbedConfig, "batch_size"), show_default=True
)
@click.option(
    "--device",
    default=default(EmbedConfig, "device"),
    show_default=True,
    help="auto, cpu or cuda.",
)
@click.option(
    "--decode-workers",
    type=int,
    default=default(EmbedConfig, "decode_workers"),
    show_default=True,
    help="DataLoader processes decoding images per shard task (the shard is read once).",
)
@click.option(
    "--decode",
    type=click.Choice(DECODERS),
    default=default(EmbedConfig, "decode"),
    show_default=True,
    help="gpu: decode JPEGs with torchvision on the encoder's device (the CPU without a GPU), "
    "falling back to PIL per image.",
)
@click.option("--json", "json_path", default=None, help="Write the end summary as JSON.")
@executor_options
def embed(
    src,
    out,
    model,
    modality,
    text_model,
    batch_size,
    device,
    decode_workers,
    decode,
    json_path,
    executor,
) -> None:
    """Embed webdataset shards (or image folders) into an embedding store."""
    config = EmbedConfig(model, text_model, modality, batch_size, device, decode_workers, decode)
    summary = run_embed(src, out, config, executor)
    extra = {"store": os.path.abspath(out), "model": model, "threads": summary["threads"]}
    if summary.get("uid_sources"):
        extra["uids by source"] = counts_line(summary["uid_sources"])
    print_summary("mmcurate embed", summary, extra)
    finish(summary, json_path)
