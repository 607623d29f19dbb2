"""What every command shares: defaults read from the stages' config dataclasses, executor
options, the end summary, --json output."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import MISSING, fields

import click

from mmcurate.data.atomic import write_json_atomic
from mmcurate.data.lock import locked
from mmcurate.engine import ExecutorConfig, make_executor


def default(cls: type, name: str):
    """The default of one field of a stage's config dataclass (what the library uses)."""
    for f in fields(cls):
        if f.name == name and f.default is not MISSING:
            return f.default
    raise KeyError(f"{cls.__name__}.{name} has no default")


def executor_options(fn: Callable) -> Callable:
    """--executor/--workers/--threads/--ray-address/--ray-gpus, turned into an `executor`."""

    @click.option(
        "--executor",
        "executor_name",
        type=click.Choice(["local", "ray"]),
        default=default(ExecutorConfig, "executor"),
        show_default=True,
        help="Where per-shard work runs.",
    )
    @click.option(
        "--workers",
        type=int,
        default=default(ExecutorConfig, "workers"),
        show_default=True,
        help="Local worker processes.",
    )
    @click.option(
        "--threads",
        default=default(ExecutorConfig, "threads"),
        show_default=True,
        help="Compute threads per worker: auto (usable cores / workers) or N; results are "
        "identical for a given value.",
    )
    @click.option(
        "--ray-address", default=None, help="Ray cluster: auto or HOST:PORT (default: local)."
    )
    @click.option(
        "--ray-gpus",
        type=float,
        default=default(ExecutorConfig, "ray_gpus"),
        show_default=True,
        help="GPUs per Ray task; a fraction shares a GPU (e.g. 0.5).",
    )
    @functools.wraps(fn)
    def wrapper(*args, executor_name, workers, threads, ray_address, ray_gpus, **kwargs):
        config = ExecutorConfig(executor_name, workers, threads, ray_address, ray_gpus)
        return fn(*args, executor=make_executor(config), **kwargs)

    return wrapper


def counts_line(counts: dict[str, int]) -> str:
    """`reason n, reason n`: a tally on one line."""
    return ", ".join(f"{reason} {n}" for reason, n in counts.items())


def print_summary(title: str, summary: dict, extra: dict | None = None) -> None:
    """A one-screen end summary: items, samples, skips by reason, failures with reasons."""
    done, already, failed = summary["done"], summary["already_done"], summary["failed"]
    click.echo(
        f"\n{title}: {len(done)} done, {len(already)} already done (skipped), {len(failed)} failed"
    )
    if "read" in summary:
        skipped = summary["skipped"]
        reasons = ", ".join(f"{k}: {v}" for k, v in skipped.items()) or "none"
        click.echo(
            f"  samples: read {summary['read']}, written {summary['rows']}, "
            f"skipped {sum(skipped.values())} ({reasons})"
        )
    for key, value in (extra or {}).items():
        if value is not None:  # e.g. threads when no item ran
            click.echo(f"  {key}: {value}")
    if failed:
        click.echo("  failed:")
        for name, reason in sorted(failed.items()):
            click.echo(f"    {name}: {reason}")


def finish(summary: dict, json_path: str | None) -> None:
    """Write --json and exit non-zero when any item failed."""
    if json_path:
        write_json_atomic(json_path, summary)
    if summary.get("failed"):
        raise SystemExit(1)


def out_param(command: click.Command) -> click.Parameter | None:
    """The command's `--out` option (the output it writes), if it has one."""
    return next((p for p in command.params if "--out" in getattr(p, "opts", ())), None)


def lock_output(command: click.Command) -> click.Command:
    """Give a command with `--out` the output lock (one run per output) and `--force-unlock`."""
    param = out_param(command)
    if param is None or command.callback is None:
        return command
    command.params.append(
        click.Option(
            ["--force-unlock"],
            is_flag=True,
            help="Take the output's lock even from a run that looks alive (only when it is "
            "certainly gone, e.g. on a host that no longer exists).",
        )
    )
    callback = command.callback

    @functools.wraps(callback)
    def run(*args, force_unlock: bool, **kwargs):
        with locked(kwargs[param.name], command.name or "mmcurate", force_unlock):
            return callback(*args, **kwargs)

    command.callback = run
    return command
