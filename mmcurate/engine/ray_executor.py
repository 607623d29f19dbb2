"""The Ray executor: work items as Ray tasks on an existing cluster, or a local one."""

from __future__ import annotations

import copy
import logging
import socket
from collections.abc import Iterator, Sequence

import ray
from ray.exceptions import OutOfMemoryError, RayError, RayTaskError, WorkerCrashedError

from mmcurate.engine import interrupts
from mmcurate.engine.base import (
    AUTO_THREADS,
    Executor,
    Outcome,
    WorkFn,
    WorkItem,
    one_line,
    pin_threads,
    resolve_threads,
    run_reported,
    wants_cuda,
)
from mmcurate.engine.report import ProgressSink, queue_sink
from mmcurate.errors import MmcurateError, UsageError

POLL_SECONDS = 0.25


@ray.remote
def _ray_task(fn: WorkFn, item: WorkItem, threads: int, reports) -> Outcome:
    """Run one item in a Ray worker; a deterministic (mmcurate) error fails it without retry,
    any other exception goes to Ray, which retries the task."""
    pin_threads(threads)
    sink = queue_sink(reports) if reports is not None else None
    return run_reported(fn, item, sink, catch=MmcurateError)


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


def node_cpus() -> list[float]:
    """The CPU count of every live node of the connected cluster."""
    return [
        float(n["Resources"].get("CPU", 0))
        for n in ray.nodes()
        if n.get("Alive") and n["Resources"].get("CPU", 0) > 0
    ]


class RayExecutor(Executor):
    """Runs each item as a Ray task with `threads` CPUs and `num_gpus` GPUs.

    `threads` auto is the smallest node's CPU count divided by `workers` (tasks per node),
    resolved when the cluster is joined. Tasks that ask for no GPU run in workers that see
    none, so they cannot use a GPU that Ray has given to another task (Ray no longer hides
    GPUs from such tasks by itself).
    """

    def __init__(
        self,
        address: str | None,
        threads: int | str,
        num_gpus: float,
        max_retries: int = 3,
        workers: int = 1,
    ) -> None:
        self.address = address
        self.workers = max(1, int(workers))
        self.requested_threads = threads
        self.threads = (
            None if str(threads) == AUTO_THREADS else resolve_threads(threads, self.workers)
        )
        self.num_gpus = float(num_gpus or 0.0)
        self.max_retries = max(0, int(max_retries))
        if address and address != "auto" and "://" not in address:
            check_reachable(address)

    def connect(self) -> None:
        """Join the cluster at `address` (auto or HOST:PORT), or start a local one when None;
        then settle the threads per task against the cluster's nodes."""
        if not ray.is_initialized():
            try:
                with interrupts.deferred():
                    self._init()
            except (ConnectionError, ValueError, RuntimeError) as exc:
                where = self.address or "a new local instance"
                raise UsageError(f"cannot start or reach Ray at {where}: {one_line(exc)}") from None
            interrupts.reinstall()  # ray.init installs its own SIGTERM handler
        cpus = node_cpus()
        if self.threads is None:
            self.threads = resolve_threads(AUTO_THREADS, self.workers, int(min(cpus, default=1)))
        if cpus and self.threads > max(cpus):
            raise UsageError(
                f"--threads {self.threads}: no Ray node has that many CPUs (largest: {max(cpus):g})"
            )

    def _init(self) -> None:
        """ray.init at `address` (a new local instance when None), quiet."""
        ray.init(
            address=self.address or "local",
            ignore_reinit_error=True,
            include_dashboard=False,
            logging_level=logging.ERROR,
            log_to_driver=False,
        )

    def check_device(self, device: str | None) -> None:
        """Refuse CUDA without GPUs per task, and GPUs per task on a cluster without them."""
        if wants_cuda(device) and not self.num_gpus:
            raise UsageError(f"--device {device} on Ray needs --ray-gpus > 0 (GPUs per task)")
        if self.num_gpus:
            self.connect()
            total = float(ray.cluster_resources().get("GPU", 0))
            if total < self.num_gpus:
                raise UsageError(
                    f"--ray-gpus {self.num_gpus:g}: the Ray cluster has {total:g} GPU(s)"
                )

    def cpu_only(self) -> RayExecutor:
        """The same cluster and threads, with tasks that hold no GPU."""
        if not self.num_gpus:
            return self
        other = copy.copy(self)
        other.num_gpus = 0.0
        return other

    def task_device(self, device: str | None) -> str:
        """Tasks with GPUs compute on CUDA unless told cpu; tasks without GPUs see none."""
        return "cuda" if self.num_gpus and device != "cpu" else "cpu"

    def map(
        self, fn: WorkFn, items: Sequence[WorkItem], on_progress: ProgressSink | None = None
    ) -> Iterator[Outcome]:
        """Submit every item at once (fn goes to the object store once); yield as tasks finish."""
        if not items:
            return
        self.connect()
        with interrupts.deferred():
            fn_ref = ray.put(fn)
        options = {
            "num_cpus": self.threads,
            "num_gpus": self.num_gpus,
            "max_retries": self.max_retries,
            "retry_exceptions": True,
        }
        if not self.num_gpus:
            options["runtime_env"] = {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}
        reports = None
        if on_progress is not None:
            from ray.util.queue import Queue

            with interrupts.deferred():
                reports = Queue(actor_options={"num_cpus": 0})
        task = _ray_task.options(**options)
        with interrupts.deferred():
            pending = {task.remote(fn_ref, item, self.threads, reports): item for item in items}
        try:
            while pending:
                refs = list(pending)
                with interrupts.deferred():
                    ready, _ = ray.wait(refs, num_returns=1, timeout=POLL_SECONDS)
                    if reports is not None:
                        _drain(reports, on_progress)
                    if ready:
                        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                for ref in ready:
                    item = pending.pop(ref)
                    try:
                        with interrupts.deferred():
                            outcome = ray.get(ref)
                    except RayError as exc:
                        reason = failure_reason(exc, self.max_retries)
                        outcome = Outcome(item.name, False, {}, reason)
                    yield outcome
        finally:
            with interrupts.deferred():
                for ref in pending:
                    ray.cancel(ref, force=True)
                if reports is not None:
                    reports.shutdown()


def _drain(reports, on_progress: ProgressSink) -> None:
    """Pass the reports waiting on a Ray queue to `on_progress`."""
    count = reports.qsize()
    if count:
        for item, fraction in reports.get_nowait_batch(count):
            on_progress(item, fraction)
