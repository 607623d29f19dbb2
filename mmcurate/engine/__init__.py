"""Executors that map a per-item function over work items, skipping finished ones."""

from __future__ import annotations

from mmcurate.engine.base import (
    AUTO_THREADS,
    Executor,
    ExecutorConfig,
    Outcome,
    WorkItem,
    pin_threads,
    pinned,
    resolve_threads,
    run_stage,
    summarise,
    usable_cores,
)
from mmcurate.engine.local import LocalExecutor
from mmcurate.engine.report import report_progress
from mmcurate.errors import UsageError


def make_executor(config: ExecutorConfig | None = None) -> Executor:
    """Turn executor settings (CLI flags or a pipeline config) into an executor."""
    c = config or ExecutorConfig()
    if int(c.workers) < 1:
        raise UsageError(f"--workers must be >= 1, got {c.workers}")
    if c.executor == "local":
        return LocalExecutor(workers=c.workers, threads=c.threads)
    if c.executor == "ray":
        resolve_threads(c.threads, c.workers)
        try:
            from mmcurate.engine.ray_executor import RayExecutor
        except ImportError:
            raise UsageError("--executor ray needs Ray: pip install 'mmcurate[ray]'") from None
        return RayExecutor(
            address=c.ray_address, threads=c.threads, num_gpus=c.ray_gpus, workers=c.workers
        )
    raise UsageError(f"unknown executor {c.executor!r}: use local or ray")


__all__ = [
    "AUTO_THREADS",
    "Executor",
    "ExecutorConfig",
    "LocalExecutor",
    "Outcome",
    "WorkItem",
    "make_executor",
    "pin_threads",
    "pinned",
    "report_progress",
    "resolve_threads",
    "run_stage",
    "summarise",
    "usable_cores",
]
