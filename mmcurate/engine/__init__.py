"""Executors that map a per-shard function over work items, skipping finished ones."""

from __future__ import annotations

from mmcurate.engine.base import Executor, Outcome, run_stage, summarise
from mmcurate.engine.local import LocalExecutor
from mmcurate.errors import UsageError


def make_executor(
    name: str = "local",
    workers: int = 1,
    threads: int = 1,
    ray_address: str | None = None,
    num_gpus: float = 0.0,
) -> Executor:
    """Turn CLI options into an executor."""
    if name == "local":
        return LocalExecutor(workers=workers, threads=threads)
    if name == "ray":
        try:
            from mmcurate.engine.ray_executor import RayExecutor
        except ImportError:
            raise UsageError("--executor ray needs Ray: pip install 'mmcurate[ray]'") from None
        return RayExecutor(address=ray_address, threads=threads, num_gpus=num_gpus)
    raise UsageError(f"unknown executor {name!r}: use local or ray")


__all__ = ["Executor", "LocalExecutor", "Outcome", "make_executor", "run_stage", "summarise"]
