"""The local executor: in this process for one worker, a process pool for several.

Pool workers are forked from multiprocessing's fork server, which imports torch and numpy
once for the whole command: a later pool starts in a fraction of a second instead of each
worker importing torch again (the fork server has run no compute, so forking it is safe)."""

from __future__ import annotations

import multiprocessing as mp
import os
import select
import sys
import threading
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from mmcurate.engine.base import (
    AUTO_THREADS,
    Executor,
    Outcome,
    WorkFn,
    WorkItem,
    pin_threads,
    pinned,
    resolve_threads,
    run_reported,
)
from mmcurate.engine.interrupts import kill_tree, signals_blocked
from mmcurate.engine.report import ProgressSink, drain, queue_sink

TRACKER_QUIET = "ignore:resource_tracker:UserWarning"
PRELOAD = ["numpy", "torch"]
DIED = "worker process died (killed or out of memory)"
POLL_SECONDS = 0.25
_worker_sink: ProgressSink | None = None


def _die_with_command(pid: int) -> None:
    """End this worker when the command that started it dies, even by SIGKILL (no handler of
    its runs then): a thread waits on the command's pidfd (Linux 5.3+; elsewhere a worker
    notices only when its queues break)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):
        return

    def watch() -> None:
        select.select([fd], [], [])
        os._exit(1)

    threading.Thread(target=watch, name="mmcurate-command-watch", daemon=True).start()


def _init_worker(command: int, threads: int, queue) -> None:
    """A pool worker: pinned to its threads, reporting progress through the queue, ending
    with the command."""
    global _worker_sink
    _die_with_command(command)
    pin_threads(threads)
    queue.cancel_join_thread()  # a worker never waits at exit to flush progress ticks
    _worker_sink = queue_sink(queue)


def _run_in_worker(fn: WorkFn, item: WorkItem) -> Outcome:
    return run_reported(fn, item, _worker_sink)


class LocalExecutor(Executor):
    """Runs items on `workers` processes, each pinned to `threads` compute threads (`auto`: the
    usable cores divided among the workers). With one worker, or one item, the item runs in
    this process, pinned only while it runs."""

    def __init__(self, workers: int, threads: int | str = AUTO_THREADS) -> None:
        self.workers = max(1, int(workers))
        self.threads = resolve_threads(threads, self.workers)

    def map(
        self, fn: WorkFn, items: Sequence[WorkItem], on_progress: ProgressSink | None = None
    ) -> Iterator[Outcome]:
        """Yield outcomes as items finish; a worker that dies fails only the item it ran.

        A dead worker breaks the whole pool. Items start in order, so the first `workers`
        unfinished items are the ones that may have been running: each is rerun alone in a
        one-process pool, where a second death names the culprit; the rest rerun in parallel.
        """
        if self.workers == 1 or len(items) <= 1:
            for item in items:
                with pinned(self.threads):
                    outcome = run_reported(fn, item, on_progress)
                yield outcome
            return
        queue = list(items)
        while queue:
            broken = yield from self._round(fn, queue, self.workers, on_progress)
            suspects, queue = broken[: self.workers], broken[self.workers :]
            while suspects:
                broken = yield from self._round(fn, suspects, 1, on_progress)
                if broken:
                    yield Outcome(broken[0].name, False, {}, DIED)
                suspects = broken[1:]

    def _round(
        self,
        fn: WorkFn,
        items: list[WorkItem],
        workers: int,
        on_progress: ProgressSink | None,
    ) -> Generator[Outcome, None, list[WorkItem]]:
        """Run items on a fresh pool; yield outcomes; return the items a dead worker broke."""
        ctx = pool_context()
        with signals_blocked():
            _start_tracker()
            reports = ctx.Queue()
        broken: list[int] = []
        try:
            with ProcessPoolExecutor(
                max_workers=min(workers, len(items)),
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(os.getpid(), self.threads, reports),
            ) as pool:
                try:
                    futures = _submit_all(pool, fn, items, broken)
                    pending = set(futures)
                    while pending:
                        finished, pending = wait(pending, POLL_SECONDS, FIRST_COMPLETED)
                        drain(reports, on_progress)
                        for future in finished:
                            try:
                                outcome = future.result()
                            except BrokenProcessPool:
                                broken.append(futures[future])
                                continue
                            yield outcome
                except BaseException:
                    _kill_pool(pool)
                    raise
        finally:
            reports.close()
            reports.join_thread()
        return [items[i] for i in sorted(broken)]


def pool_context() -> mp.context.BaseContext:
    """The fork server's context, preloading the heavy imports every worker needs (spawn
    where there is no fork server: Windows)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _start_tracker() -> None:
    """Start the resource tracker told not to warn about the semaphores of workers an interrupt
    killed: it still frees them when the command exits, which is all the warning would ask."""
    from multiprocessing import resource_tracker

    if TRACKER_QUIET not in sys.warnoptions:
        sys.warnoptions.append(TRACKER_QUIET)  # the tracker is started with this interpreter's -W
    resource_tracker.ensure_running()


def _submit_all(pool: ProcessPoolExecutor, fn: WorkFn, items: list[WorkItem], broken: list[int]):
    """Submit every item (the pool spawns its workers here, with SIGINT/SIGTERM blocked so only
    this process acts on them); items a broken pool refused go to `broken`."""
    futures = {}
    with signals_blocked():
        for i, item in enumerate(items):
            try:
                futures[pool.submit(_run_in_worker, fn, item)] = i
            except BrokenProcessPool:
                broken.extend(range(i, len(items)))
                break
    return futures


def _kill_pool(pool: ProcessPoolExecutor) -> None:
    """Stop a pool now (an interrupt): kill each worker and what it started, drop queued work."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        kill_tree(process.pid)
    pool.shutdown(wait=False, cancel_futures=True)
