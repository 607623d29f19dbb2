"""The local executor: failure isolation, skip-done, pinned threads, same results for any count."""

from __future__ import annotations

import functools
import os

from conftest import Item

from mmcurate.engine import LocalExecutor, run_stage, summarise
from mmcurate.errors import ShardError


def square_or_fail(offset: int, item: Item) -> dict:
    """A per-item function for the tests: fails on purpose for 'bad'."""
    if item.name == "bad":
        raise ShardError("bad: broken on purpose")
    if item.name == "crash":
        raise ValueError("unexpected\nsecond line")
    import torch

    return {"rows": item.x**2 + offset, "threads": torch.get_num_threads(), "pid": os.getpid()}


def _items():
    return [Item(f"s{i}", i) for i in range(5)] + [Item("bad"), Item("crash")]


def test_failures_are_isolated_and_one_line():
    for workers in (1, 2):
        outcomes, _ = run_stage(
            LocalExecutor(workers, 1), functools.partial(square_or_fail, 1), _items()
        )
        summary = summarise(outcomes, [])
        assert summary["failed"] == {
            "bad": "bad: broken on purpose",
            "crash": "ValueError: unexpected",
        }
        assert sorted(o.stats["rows"] for o in outcomes if o.ok) == [1, 2, 5, 10, 17]
        assert all(o.stats["threads"] == 1 for o in outcomes if o.ok)


def test_two_workers_use_two_processes_and_done_items_are_skipped():
    outcomes, skipped = run_stage(
        LocalExecutor(2, 1),
        functools.partial(square_or_fail, 0),
        _items()[:5],
        is_done=lambda item: item.x < 2,
    )
    assert skipped == ["s0", "s1"] and [o.name for o in outcomes] == ["s2", "s3", "s4"]
    assert os.getpid() not in {o.stats["pid"] for o in outcomes}
