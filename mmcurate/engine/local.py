"""The local executor: in this process for one worker, a spawned process pool for several."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

from mmcurate.engine.base import Executor, Outcome, WorkFn, WorkItem, pin_threads, run_item

DIED = "worker process died (killed or out of memory)"


class LocalExecutor(Executor):
    """Runs items on `workers` processes, each pinned to `threads` compute threads."""

    def __init__(self, workers: int, threads: int) -> None:
        self.workers = max(1, int(workers))
        self.threads = max(1, int(threads))

    def map(self, fn: WorkFn, items: Sequence[WorkItem]) -> Iterator[Outcome]:
        """Yield outcomes as items finish; a worker that dies fails only the item it ran.

        A dead worker breaks the whole pool. Items start in order, so the first `workers`
        unfinished items are the ones that may have been running: each is rerun alone in a
        one-process pool, where a second death names the culprit; the rest rerun in parallel.
        """
        if self.workers == 1 or len(items) <= 1:
            pin_threads(self.threads)
            for item in items:
                yield run_item(fn, item)
            return
        queue = list(items)
        while queue:
            broken = yield from self._round(fn, queue, self.workers)
            suspects, queue = broken[: self.workers], broken[self.workers :]
            while suspects:
                broken = yield from self._round(fn, suspects, 1)
                if broken:
                    yield Outcome(broken[0].name, False, {}, DIED)
                suspects = broken[1:]

    def _round(
        self, fn: WorkFn, items: list[WorkItem], workers: int
    ) -> Generator[Outcome, None, list[WorkItem]]:
        """Run items on a fresh pool; yield outcomes; return the items a dead worker broke."""
        broken: list[int] = []
        with ProcessPoolExecutor(
            max_workers=min(workers, len(items)),
            mp_context=mp.get_context("spawn"),
            initializer=pin_threads,
            initargs=(self.threads,),
        ) as pool:
            futures = {}
            for i, item in enumerate(items):
                try:
                    futures[pool.submit(run_item, fn, item)] = i
                except BrokenProcessPool:
                    broken.extend(range(i, len(items)))
                    break
            for future in as_completed(futures):
                try:
                    outcome = future.result()
                except BrokenProcessPool:
                    broken.append(futures[future])
                    continue
                yield outcome
        return [items[i] for i in sorted(broken)]
