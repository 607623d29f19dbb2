"""`mmcurate verify`: check an output directory against its done markers."""

from __future__ import annotations

from pathlib import Path

import click

from mmcurate.data.markers import verify_dir
from mmcurate.errors import UsageError


@click.command("verify")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--invalidate",
    is_flag=True,
    help="Remove the done marker of every item with a bad file, so re-running the stage "
    "redoes exactly those items.",
)
def verify_cmd(directory: str, invalidate: bool) -> None:
    """Check every file a done marker or manifest under DIRECTORY vouches for (size and xxh3
    checksum); list each missing, resized or changed file; exit 1 if any."""
    if not Path(directory).is_dir():
        raise UsageError(f"not a directory: {directory}")
    markers, files, problems = verify_dir(directory, invalidate=invalidate)
    if not markers:
        raise UsageError(f"{directory} holds no done markers with file records to verify")
    for problem in problems:
        click.echo(problem)
    bad = f"{len(problems)} bad file(s)" if problems else "all good"
    click.echo(f"verify: {markers} marker(s), {files} file(s) checked, {bad}")
    if problems and invalidate:
        click.echo("  their markers were removed: re-run the stage to redo those items")
    if problems:
        raise SystemExit(1)
