"""The Ray executor: work items as Ray tasks on an existing cluster, or a local one."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator, Sequence

import ray
from ray.exceptions import OutOfMemoryError, RayError, RayTaskError, WorkerCrashedError

from mmcurate.engine.base import (
    Executor,
    Outcome,
    WorkFn,
    WorkItem,
    one_line,
    pin_threads,
    run_item,
)
from mmcurate.errors import MmcurateError, UsageError


@ray.remote
def _ray_task(fn: WorkFn, item: WorkItem, threads: int) -> Outcome:
    """Run one item in a Ray worker; a deterministic (mmcurate) error fails it without retry,
    any other exception goes to Ray, which retries the task."""
    pin_threads(threads)
    return run_item(fn, item, catch=MmcurateError)


def failure_reason(exc: Exception, retries: int) -> str:
    """A one-line reason for a task that still failed after its retries."""
    if isinstance(exc, RayTaskError):
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        reason = one_line(cause)
    elif isinstance(exc, (WorkerCrashedError, OutOfMemoryError)):
        reason = "worker process died (killed or out of memory)"
    else:
        reason = one_line(exc)
    return f"{reason} (after {retries} retries)"


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """Refuse a HOST:PORT nobody listens on (ray.init would wait for minutes)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--ray-address must be auto or HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UsageError(f"cannot reach Ray at {address}: {one_line(exc)}") from None


class RayExecutor(Executor):
    """Runs each item as a Ray task with `threads` CPUs and `num_gpus` GPUs.

    Tasks that ask for no GPU run in workers that see none, so they cannot use a GPU that
    Ray has given to another task (Ray no longer hides GPUs from such tasks by itself).
    """

    def __init__(
        self, address: str | None, threads: int, num_gpus: float, max_retries: int = 3
    ) -> None:
        self.address = address
        self.threads = max(1, int(threads))
        self.num_gpus = float(num_gpus or 0.0)
        self.max_retries = max(0, int(max_retries))
        if address and address != "auto" and "://" not in address:
            check_reachable(address)

    def connect(self) -> None:
        """Join the cluster at `address` (auto or HOST:PORT), or start a local one when None."""
        if ray.is_initialized():
            return
        try:
            ray.init(
                address=self.address or "local",
                ignore_reinit_error=True,
                include_dashboard=False,
                logging_level=logging.ERROR,
                log_to_driver=False,
            )
        except (ConnectionError, ValueError, RuntimeError) as exc:
            where = self.address or "a new local instance"
            raise UsageError(f"cannot start or reach Ray at {where}: {one_line(exc)}") from None

    def map(self, fn: WorkFn, items: Sequence[WorkItem]) -> Iterator[Outcome]:
        """Submit every item at once (fn goes to the object store once); yield as tasks finish."""
        if not items:
            return
        self.connect()
        fn_ref = ray.put(fn)
        options = {
            "num_cpus": self.threads,
            "num_gpus": self.num_gpus,
            "max_retries": self.max_retries,
            "retry_exceptions": True,
        }
        if not self.num_gpus:
            options["runtime_env"] = {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}
        task = _ray_task.options(**options)
        pending = {task.remote(fn_ref, item, self.threads): item for item in items}
        try:
            while pending:
                refs = list(pending)
                ray.wait(refs, num_returns=1)
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                for ref in ready:
                    item = pending.pop(ref)
                    try:
                        yield ray.get(ref)
                    except RayError as exc:
                        yield Outcome(item.name, False, {}, failure_reason(exc, self.max_retries))
        finally:
            for ref in pending:
                ray.cancel(ref)
