"""`mmcurate report`: one self-contained HTML page for a scored pool."""

from __future__ import annotations

import click

from mmcurate.cli.common import default
from mmcurate.report import ReportConfig, write_report


@click.command("report")
@click.argument("scores", type=click.Path())
@click.option(
    "--subset", type=click.Path(), default=None, help="subset.npy (its subset.json beside)."
)
@click.option(
    "--shards",
    multiple=True,
    help="Shards to take thumbnails and captions from (SRC…, repeatable).",
)
@click.option("--out", required=True, type=click.Path(), help="report.html to write.")
@click.option(
    "--examples",
    type=int,
    default=default(ReportConfig, "examples"),
    show_default=True,
    help="Example rows per band (top, each cut-off, bottom).",
)
@click.option("--seed", type=int, default=default(ReportConfig, "seed"), show_default=True)
@click.option("--title", default=default(ReportConfig, "title"), show_default=True)
def report_cmd(scores, subset, shards, out, examples, seed, title) -> None:
    """Write one self-contained HTML page: histograms, funnel, examples, SemDeDup, NormSim."""
    if examples < 1:
        raise click.BadParameter("must be at least 1", param_hint="--examples")
    config = ReportConfig(
        subset=subset, shards=tuple(shards), examples=examples, seed=seed, title=title
    )
    summary = write_report(scores, out, config)
    click.echo(
        f"\nmmcurate report: {summary['pool']:,} rows, {len(summary['columns'])} score column(s), "
        f"{summary['shown_rows']} rows shown, {summary['thumbnails']} thumbnails"
    )
    click.echo(
        f"  report: {summary['out']} ({summary['bytes'] / 1e6:.2f} MB, {summary['seconds']:.1f} s)"
    )
