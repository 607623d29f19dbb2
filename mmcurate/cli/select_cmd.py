"""`mmcurate select` (score sidecars -> subset.npy) and `mmcurate reshard` (subset -> shards)."""

from __future__ import annotations

import click

from mmcurate.cli.common import counts_line, default, executor_options, finish, print_summary
from mmcurate.curate.reshard import ReshardConfig, reshard
from mmcurate.curate.rules import TIES
from mmcurate.curate.select import DEFAULT_RECIPE, SelectConfig, run_select
from mmcurate.data.atomic import write_json_atomic
from mmcurate.data.subset import record_path


def _stage_line(stage: dict) -> str:
    cutoff = stage.get("threshold")
    extra = f", nan {stage['nan']}" if stage.get("nan") else ""
    if stage["kind"] == "fraction" and cutoff is not None:
        extra += f", cutoff {cutoff:.6g}"
    if stage.get("ties") == "datacomp":
        extra += f", DataComp rule at index {stage['index']}"
        if cutoff is None:
            extra += " (past the scored rows: all kept)"
    if "centroids" in stage:
        made = stage["centroids"]
        extra += (
            f", caption filter {stage['caption_filter']}, {made['clusters']} centroids "
            f"({made['source']}), {stage['target_centroids']} picked by the targets"
        )
    return f"  {stage['rule']:<24} kept {stage['count']} of {stage['input']}{extra}"


@click.command("select")
@click.argument("scores", required=False, type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="subset.npy to write.")
@click.option(
    "--keep",
    multiple=True,
    help="metric:FRACTION (of the whole pool), metric>=X, metric<=X, column==TEXT (lang==en), "
    "normsim_d:FRACTION, or a DataComp baseline: datacomp:basic, datacomp:text_based, "
    "datacomp:laion2b, datacomp:image_based; in order. A metric is a score column (also "
    "DataComp's clip_l14_similarity_score) or caption_words, caption_chars, min_side, "
    f"aspect_ratio. Default: {' then '.join(DEFAULT_RECIPE)}.",
)
@click.option(
    "--ties",
    type=click.Choice(TIES),
    default=default(SelectConfig, "ties"),
    show_default=True,
    help="Fraction rules: exact keeps floor(f·N), ties to the smaller uid; datacomp keeps "
    "every row scoring at least the one at index int(N·f) of the descending sort, as "
    "DataComp's baselines do.",
)
@click.option("--union", multiple=True, type=click.Path(), help="Add a subset file (repeatable).")
@click.option("--intersect", multiple=True, type=click.Path(), help="Intersect with a subset file.")
@click.option(
    "--store",
    type=click.Path(),
    default=None,
    help="Embedding store or DataComp metadata directory: embeddings (normsim_d, "
    "datacomp:image_based), and captions and image sizes the scores lack. Default for those: "
    "SCORES itself when it is a metadata directory.",
)
@click.option(
    "--normsim-d-iters",
    type=int,
    default=default(SelectConfig, "normsim_d_iters"),
    show_default=True,
)
@click.option(
    "--normsim-d-memory",
    default=default(SelectConfig, "normsim_d_memory"),
    help="Embeddings NormSim-D may hold in memory, e.g. 8GiB; beyond it rows are re-read "
    "from the store on each pass. Default: a quarter of RAM, at most 64 GiB.",
)
@click.option(
    "--img-key",
    default=default(SelectConfig, "img_key"),
    help="Image array in the store (normsim_d). Default: detected as by score.",
)
@click.option(
    "--seed",
    type=int,
    default=default(SelectConfig, "seed"),
    show_default=True,
    help="NormSim-D sampling seed; also the image-based k-means seed.",
)
@click.option(
    "--centroids",
    type=click.Path(dir_okay=False),
    default=default(SelectConfig, "centroids"),
    help="datacomp:image_based centroids: DataComp's {scale}_centroids_l14.pt or a .npy. "
    "Default: FAISS k-means here on the caption-filtered rows.",
)
@click.option(
    "--target",
    multiple=True,
    type=click.Path(),
    help="datacomp:image_based targets, e.g. in1k_clip_vit_l14_0.pt (repeatable): .pt, .npy "
    "or a store.",
)
@click.option(
    "--image-clusters",
    type=int,
    default=default(SelectConfig, "image_clusters"),
    show_default=True,
    help="k-means clusters when no --centroids are given (at most rows/39).",
)
@click.option(
    "--save-centroids",
    type=click.Path(dir_okay=False),
    default=default(SelectConfig, "save_centroids"),
    help="Save the centroids k-means made here (no --centroids) as a .npy, for later runs' "
    "--centroids.",
)
@click.option(
    "--wordnet",
    type=click.Path(file_okay=False),
    default=default(SelectConfig, "wordnet"),
    help="datacomp:text_based: an nltk_data directory holding corpora/wordnet. Default: "
    "NLTK's search path.",
)
@click.option(
    "--device",
    default=default(SelectConfig, "device"),
    show_default=True,
    help="datacomp:image_based assignment: auto, cpu, cuda.",
)
@click.option("--json", "json_path", default=None, help="Write the end summary as JSON.")
def select_cmd(scores, out, json_path, **options) -> None:
    """Keep the best pairs of a scored pool: chained --keep stages, then --union/--intersect."""
    report = run_select(scores, out, SelectConfig(**options))
    if scores is not None:
        files = "sidecars" if report["source"] == "sidecars" else "metadata files"
        click.echo(f"\nmmcurate select: pool {report['pool']} rows in {report['sidecars']} {files}")
        for stage in report["stages"]:
            click.echo(_stage_line(stage))
        if report["duplicate_uids"]:
            click.echo(f"  duplicate uid rows merged: {report['duplicate_uids']}")
    else:
        click.echo("\nmmcurate select: subset files only")
    for entry in report["union"]:
        click.echo(f"  union {entry['path']} ({entry['count']} uids)")
    for entry in report["intersect"]:
        click.echo(f"  intersect {entry['path']} ({entry['count']} uids)")
    click.echo(f"  subset: {report['count']} uids -> {out} (record: {record_path(out)})")
    if json_path:
        write_json_atomic(json_path, report)


@click.command("reshard")
@click.argument("src", nargs=-1, required=True)
@click.option("--subset", required=True, type=click.Path(), help="subset.npy ((u8, u8) uids).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option(
    "--shard-size", type=int, default=default(ReshardConfig, "shard_size"), show_default=True
)
@click.option("--json", "json_path", default=None, help="Write the end summary as JSON.")
@executor_options
def reshard_cmd(src, subset, out, shard_size, json_path, executor) -> None:
    """Write webdataset shards holding exactly the subset's samples, each once."""
    summary = reshard(src, subset, out, ReshardConfig(shard_size), executor)
    dups = summary["duplicates_within_shards"] + summary["duplicates_across_shards"]
    missing = summary["not_found"]
    lines = {
        "samples": f"read {summary['read']}, in subset {summary['matched']}, written "
        f"{summary['written']} in {len(summary['shards'])} shard(s) of {summary['shard_size']}",
        "duplicates dropped (first occurrence kept)": dups,
        "subset uids not found": f"{missing} of {summary['subset_size']}"
        + (
            f" (listed in not_found.npy; e.g. {', '.join(summary['not_found_examples'])})"
            if missing
            else ""
        ),
        "output": out,
    }
    if summary["renamed_keys"]:
        lines["keys renamed to avoid a clash in a shard"] = summary["renamed_keys"]
    if summary.get("skipped"):
        lines["samples skipped (not copied)"] = counts_line(summary["skipped"])
    if summary.get("uid_sources"):
        lines["uids of the samples read"] = counts_line(summary["uid_sources"])
    lines["layout"] = "img2dataset (NNNNN.tar + .parquet + _stats.json), sizes.json"
    if summary.get("already_complete"):
        click.echo("\nmmcurate reshard: already complete (same subset, sources and shard size)")
        for key, value in lines.items():
            click.echo(f"  {key}: {value}")
    else:
        counts = {k: summary[k] for k in ("done", "already_done", "failed")}
        print_summary("mmcurate reshard", counts, lines)
    finish(summary, json_path)
