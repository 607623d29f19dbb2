"""`mmcurate score`: embedding store -> per-stem sidecars of CLIPScore, negCLIPLoss, NormSim."""

from __future__ import annotations

import click

from mmcurate.cli.common import executor_options, finish, print_summary
from mmcurate.curate.score_stage import METRICS, make_config, run_score


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
    "targets",
    multiple=True,
    help="NormSim target: store dir, .npy or .pt (repeatable; concatenated).",
)
@click.option(
    "--p", "ps", multiple=True, help="NormSim exponent: 2, inf or any number > 0 (repeatable)."
)
@click.option(
    "--temperature",
    type=float,
    default=None,
    help="negCLIPLoss τ. Default: 1/logit_scale recorded in the store, else 0.01.",
)
@click.option("--batch-size", type=int, default=32768, show_default=True, help="negclip B.")
@click.option("--k", type=int, default=10, show_default=True, help="negclip batchings K.")
@click.option(
    "--window", type=int, default=1_048_576, show_default=True, help="Min rows per window."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--img-key", default="img", show_default=True, help="npz key of image embeddings.")
@click.option("--txt-key", default="txt", show_default=True, help="npz key of text embeddings.")
@click.option(
    "--normsim-index",
    type=click.Choice(["flat", "ivf", "hnsw"]),
    default="flat",
    show_default=True,
    help="FAISS index for normsim_inf; ivf/hnsw are approximate and report their recall.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--json", "json_path", default=None, help="Write the end summary as JSON.")
@executor_options
def score(
    store,
    out,
    metrics,
    targets,
    ps,
    temperature,
    batch_size,
    k,
    window,
    seed,
    img_key,
    txt_key,
    normsim_index,
    device,
    json_path,
    executor,
) -> None:
    """Score every pair of an embedding store into <stem>.scores.parquet sidecars."""
    cfg = make_config(
        store,
        out,
        metrics=metrics,
        ps=ps,
        targets=targets,
        temperature=temperature,
        batch_size=batch_size,
        k=k,
        window=window,
        seed=seed,
        img_key=img_key,
        txt_key=txt_key,
        normsim_index=normsim_index,
        device=device,
    )
    summary = run_score(cfg, executor)
    extra = {
        "windows": f"{summary['windows']} ({summary['stems']} stems)",
        "metrics": ", ".join(summary["metrics"]),
    }
    if "negclip" in cfg.columns:
        extra["negclip"] = (
            f"τ={cfg.tau:g} ({cfg.tau_source}), B={cfg.batch_size}, K={cfg.k}, "
            f"window={cfg.window}, seed={cfg.seed}"
        )
    if cfg.target_shape:
        recall = summary.get("normsim_inf_recall_min")
        extra["target"] = f"{cfg.target_shape[0]} x {cfg.target_shape[1]}, index {normsim_index}"
        if recall is not None:
            extra["target"] += f", normsim_inf recall@1 >= {recall:.4f} (sampled per window)"
    extra["sidecars"] = out
    print_summary("mmcurate score", summary, extra)
    finish(summary, json_path)
