"""Executors that map a per-item function over work items, skipping finished ones."""

from __future__ import annotations

from mmcurate.engine.base import (
    Executor,
    ExecutorConfig,
    Outcome,
    WorkItem,
    pin_threads,
    run_stage,
    summarise,
)
from mmcurate.engine.local import LocalExecutor
from mmcurate.errors import UsageError


def make_executor(config: ExecutorConfig | None = None) -> Executor:
    """Turn executor settings (CLI flags or a pipeline config) into an executor."""
    c = config or ExecutorConfig()
    if c.executor == "local":
        return LocalExecutor(workers=c.workers, threads=c.threads)
    if c.executor == "ray":
        try:
            from mmcurate.engine.ray_executor import RayExecutor
        except ImportError:
            raise UsageError("--executor ray needs Ray: pip install 'mmcurate[ray]'") from None
        return RayExecutor(address=c.ray_address, threads=c.threads, num_gpus=c.ray_gpus)
    raise UsageError(f"unknown executor {c.executor!r}: use local or ray")


__all__ = [
    "Executor",
    "ExecutorConfig",
    "LocalExecutor",
    "Outcome",
    "WorkItem",
    "make_executor",
    "pin_threads",
    "run_stage",
    "summarise",
]
