"""The `mmcurate` command: a click group whose commands never show a traceback for bad input."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import click

from mmcurate.cli.common import lock_output
from mmcurate.cli.distill_cmds import buffer, distill_cmd, evaluate_cmd
from mmcurate.cli.embed_cmd import embed
from mmcurate.cli.pipeline_cmds import demo, pipeline
from mmcurate.cli.report_cmd import report_cmd
from mmcurate.cli.score_cmd import score
from mmcurate.cli.select_cmd import reshard_cmd, select_cmd
from mmcurate.cli.verify_cmd import verify_cmd
from mmcurate.engine import interrupts
from mmcurate.errors import Interrupted, MmcurateError, UsageError


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"Warning: {message}\n"


class Group(click.Group):
    """Turns MmcurateError into one line and exit 2; unexpected errors into one line and exit 1;
    SIGINT/SIGTERM into one line and exit 130/143, with every process it started killed."""

    def invoke(self, ctx: click.Context):
        with interrupts.handling():
            try:
                return self._invoke(ctx)
            except Interrupted as exc:
                code = interrupts.stop(exc)
        sys.exit(code)

    def _invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)
        except MmcurateError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except Exception as exc:
            if os.environ.get("MMCURATE_DEBUG"):
                raise
            click.echo(
                f"Error: internal error {type(exc).__name__}: {exc} (set MMCURATE_DEBUG=1 for a "
                "traceback)",
                err=True,
            )
            sys.exit(1)


@click.group(cls=Group)
@click.version_option(package_name="mmcurate")
def cli() -> None:
    """Score, select and distill image-text corpora."""
    warnings.formatwarning = _one_line_warning
    logging.basicConfig(level=logging.ERROR)


for command in (
    embed,
    score,
    select_cmd,
    reshard_cmd,
    buffer,
    distill_cmd,
    evaluate_cmd,
    report_cmd,
    pipeline,
    demo,
    verify_cmd,
):
    cli.add_command(lock_output(command))


def main() -> None:
    """Console-script entry point."""
    cli()
