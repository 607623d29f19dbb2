"""`run_pipeline`: the stages of a plan in order, each skipped, resumed or run by its marker.

A stage is skipped only when its done marker holds the same hash, its outputs exist and nothing
upstream ran; otherwise it runs, and so does everything after it. A stage resumes its own
unfinished work (finished shards, experts, the distillation checkpoint) only when its running
marker shows it was interrupted with the same hash; with any other hash its directory is
cleared first, so no stale shard is ever reused.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mmcurate.data.atomic import write_json_atomic
from mmcurate.data.lock import locked
from mmcurate.embed import check_device_name
from mmcurate.engine import make_executor
from mmcurate.errors import MmcurateError, UsageError
from mmcurate.pipeline.config import STAGES, Plan
from mmcurate.pipeline.fingerprint import RUNNING_SUFFIX, marker_path, read_marker, stage_hash
from mmcurate.pipeline.stages import BODIES, Context


def _compact(value: Any, limit: int = 20) -> Any:
    """A summary small enough for a marker: long lists become their length."""
    if isinstance(value, dict):
        return {str(k): _compact(v, limit) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return len(value) if len(value) > limit else [_compact(v, limit) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _stage_range(plan: Plan, start: str | None, until: str | None) -> list[str]:
    present = [s for s in STAGES if s in plan.stages]
    for name, flag in ((start, "--from"), (until, "--until")):
        if name is not None and name not in present:
            raise UsageError(f"{flag} {name}: not a stage of this config ({', '.join(present)})")
    lo = present.index(start) if start else 0
    hi = present.index(until) if until else len(present) - 1
    if lo > hi:
        raise UsageError(f"--from {start} comes after --until {until}")
    return present[: hi + 1]


def _clear(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _check_failures(stage: str, summary: dict, plan: Plan) -> None:
    failed = summary.get("failed") or {}
    if len(failed) > int(plan.settings["max_failed_items"]):
        name, reason = next(iter(sorted(failed.items())))
        raise MmcurateError(
            f"stage {stage}: {len(failed)} item(s) failed (first: {name}: {reason}); fix or "
            "remove them and re-run (finished items are kept), or raise max_failed_items"
        )


def run_pipeline(
    plan: Plan,
    *,
    start: str | None = None,
    until: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = click.echo,
) -> dict[str, Any]:
    """Run the plan's stages in order, holding the run directory's lock (one run per output);
    returns {stage: {"status", "hash", "summary", ...}}."""
    with locked(plan.out, "pipeline"):
        return _run_stages(plan, start, until, progress, echo)


def _run_stages(
    plan: Plan,
    start: str | None,
    until: str | None,
    progress: bool,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """The stages of `run_pipeline`, in order."""
    stages = _stage_range(plan, start, until)
    ctx = Context(plan, make_executor(plan.executor), progress)
    check_device_name(ctx.device)
    ctx.executor.check_device(ctx.device)
    plan.out.mkdir(parents=True, exist_ok=True)
    hashes: dict[str, str] = {}
    report: dict[str, Any] = {}
    ran_upstream = False
    forced = False
    for stage in stages:
        producers = [p for p in STAGES[: STAGES.index(stage)] if p in hashes]
        h = stage_hash(plan, stage, {p: hashes[p] for p in producers})
        hashes[stage] = h
        forced = forced or stage == start
        marker = read_marker(plan.out, stage)
        outputs_ok = bool(marker) and all(Path(p).exists() for p in marker.get("outputs", []))
        valid = bool(marker) and marker.get("hash") == h and outputs_ok
        if start and not forced:
            if not valid:
                raise UsageError(
                    f"--from {start}: stage {stage} has not finished with this config; "
                    f"run without --from (or --from {stage})"
                )
            report[stage] = {"status": "skipped", "hash": h, "summary": marker.get("summary")}
            echo(f"== {stage}: done earlier, skipped ({h[:12]})")
            continue
        if valid and not ran_upstream and not forced:
            report[stage] = {"status": "skipped", "hash": h, "summary": marker.get("summary")}
            echo(f"== {stage}: done earlier, skipped ({h[:12]})")
            continue
        running = read_marker(plan.out, stage, RUNNING_SUFFIX)
        resume = bool(running) and running.get("hash") == h and not ran_upstream
        resume = resume and not (forced and stage == start)
        marker_path(plan.out, stage).unlink(missing_ok=True)
        if not resume:
            _clear(plan.stage_dir(stage))
        write_json_atomic(marker_path(plan.out, stage, RUNNING_SUFFIX), {"stage": stage, "hash": h})
        echo(f"== {stage}: {'resuming' if resume else 'running'} ({h[:12]})")
        began = time.perf_counter()
        summary, outputs = BODIES[stage](ctx)
        _check_failures(stage, summary, plan)
        seconds = round(time.perf_counter() - began, 3)
        write_json_atomic(
            marker_path(plan.out, stage),
            {
                "stage": stage,
                "hash": h,
                "config": _compact(plan.stages[stage]),
                "upstream": {p: hashes[p] for p in producers},
                "outputs": [str(p) for p in outputs],
                "seconds": seconds,
                "resumed": resume,
                "summary": _compact(summary),
            },
        )
        marker_path(plan.out, stage, RUNNING_SUFFIX).unlink(missing_ok=True)
        ran_upstream = True
        report[stage] = {
            "status": "resumed" if resume else "ran",
            "hash": h,
            "summary": summary,
            "seconds": seconds,
        }
        echo(f"   {stage} finished in {seconds:.1f} s")
    return report
