"""A worker process that dies (OOM killer, segfaulting decoder) fails only its own item."""

from __future__ import annotations

import functools
import os
import time

from conftest import Item

from faults.figures import FIGURES
from mmcurate.engine import LocalExecutor, run_stage, summarise
from mmcurate.engine.local import DIED


def die_on(names: frozenset[str], item: Item) -> dict:
    """Work function: the process exits abruptly on the named items, as if SIGKILLed."""
    time.sleep(0.05 * (item.x % 3))
    if item.name in names:
        os._exit(9)
    return {"rows": item.x, "pid": os.getpid()}


def test_a_dying_worker_fails_only_its_item():
    items = [Item(f"s{i:02d}", i) for i in range(8)]
    dying = frozenset({"s03"})
    outcomes, _ = run_stage(
        LocalExecutor(workers=2, threads=1), functools.partial(die_on, dying), items
    )
    summary = summarise(outcomes, [])
    others_done = summary["done"] == [it.name for it in items if it.name not in dying]
    for name in sorted(dying):
        FIGURES.record_kill("worker", summary["failed"].get(name) == DIED and others_done)
    assert summary["failed"] == {name: DIED for name in sorted(dying)}
    assert summary["done"] == [it.name for it in items if it.name not in dying]
    assert summary["rows"] == sum(it.x for it in items if it.name not in dying)
