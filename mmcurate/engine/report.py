"""Progress from inside a work item: how far the current item is, sent to the caller's bar.

A work function calls `report_progress(fraction)` (0..1) as it goes, for example once per
negclip batch. The executor decides where that goes: straight to the bar when the item runs in
the calling process, through a queue from a worker process or a Ray task. Outside an executor
it is a no-op, so library functions can report unconditionally.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

ProgressSink = Callable[[str, float], None]
MIN_INTERVAL = 0.2

_sink: ProgressSink | None = None
_item: str | None = None
_last = 0.0


def report_progress(fraction: float, *, final: bool = False) -> None:
    """Tell the caller's progress bar the current item is `fraction` done (at most every 0.2 s,
    unless `final`)."""
    global _last
    if _sink is None or _item is None:
        return
    now = time.monotonic()
    if not final and now - _last < MIN_INTERVAL:
        return
    _last = now
    _sink(_item, min(max(float(fraction), 0.0), 1.0))


@contextmanager
def reporting(sink: ProgressSink | None, item: str) -> Iterator[None]:
    """Send the reports of the block (one work item) to `sink`."""
    global _sink, _item, _last
    saved = (_sink, _item)
    _sink, _item, _last = sink, item, 0.0
    try:
        yield
    finally:
        _sink, _item = saved


def queue_sink(queue) -> ProgressSink:
    """A sink that puts (item, fraction) on a multiprocessing or Ray queue, never blocking."""

    def put(item: str, fraction: float) -> None:
        try:
            queue.put_nowait((item, fraction))
        except Exception:  # a full or closed queue only loses a progress tick
            pass

    return put


def drain(queue, on_progress: ProgressSink | None) -> None:
    """Pass every report waiting on a multiprocessing queue to `on_progress`."""
    import queue as queue_module

    while True:
        try:
            item, fraction = queue.get_nowait()
        except (queue_module.Empty, OSError, ValueError, EOFError):
            return
        if on_progress is not None:
            on_progress(item, fraction)
