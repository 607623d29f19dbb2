"""The local executor: in this process for one worker, a spawned process pool for several."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

from mmcurate.engine.base import Executor, Outcome, WorkFn, pin_threads, run_item


class LocalExecutor(Executor):
    """Runs items on `workers` processes, each pinned to `threads` compute threads."""

    def __init__(self, workers: int = 1, threads: int = 1) -> None:
        self.workers = max(1, int(workers))
        self.threads = max(1, int(threads))

    def map(self, fn: WorkFn, items: Sequence[dict]) -> Iterator[Outcome]:
        """Yield outcomes as items finish; a crashed worker fails its items, not the run."""
        if self.workers == 1 or len(items) <= 1:
            pin_threads(self.threads)
            for item in items:
                yield run_item(fn, item)
            return
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=min(self.workers, len(items)),
            mp_context=ctx,
            initializer=pin_threads,
            initargs=(self.threads,),
        ) as pool:
            futures = {pool.submit(run_item, fn, item): item for item in items}
            for future in as_completed(futures):
                try:
                    yield future.result()
                except BrokenProcessPool:
                    name = futures[future]["name"]
                    yield Outcome(name, False, {}, "worker process died (killed or out of memory)")
