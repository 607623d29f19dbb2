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


def test_auto_threads_are_the_usable_cores_divided_among_workers(monkeypatch):
    import mmcurate.engine.base as base
    from mmcurate.engine import ExecutorConfig, resolve_threads

    assert ExecutorConfig().threads == "auto"
    monkeypatch.setattr(base.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert base.usable_cores() == 8
    assert [resolve_threads("auto", w) for w in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    assert LocalExecutor(workers=2, threads="auto").threads == 4
    assert LocalExecutor(workers=2, threads=3).threads == 3


def test_zero_or_bad_threads_are_refused():
    import pytest

    from mmcurate.engine import resolve_threads
    from mmcurate.errors import UsageError

    for bad in (0, "0", -1, "many"):
        with pytest.raises(UsageError, match="--threads must be auto or an integer >= 1"):
            resolve_threads(bad, 1)


def test_the_calling_process_is_pinned_only_while_an_item_runs_in_it():
    import torch

    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    outcomes, _ = run_stage(
        LocalExecutor(1, other), functools.partial(square_or_fail, 0), _items()[:2]
    )
    assert [o.stats["threads"] for o in outcomes] == [other, other]
    assert {o.stats["pid"] for o in outcomes} == {os.getpid()}
    assert torch.get_num_threads() == before
    outcomes, _ = run_stage(
        LocalExecutor(2, other), functools.partial(square_or_fail, 0), _items()[:3]
    )
    assert {o.stats["threads"] for o in outcomes} == {other}
    assert os.getpid() not in {o.stats["pid"] for o in outcomes}
    assert torch.get_num_threads() == before


def reporting_item(item: Item) -> dict:
    """Reports a quarter, a half and three quarters done, a little apart, then finishes."""
    import time

    from mmcurate.engine import report_progress

    for fraction in (0.25, 0.5, 0.75):
        report_progress(fraction)
        time.sleep(0.3)
    return {"rows": 1}


def note(events: list, name: str, fraction: float) -> None:
    events.append((name, fraction))


def test_items_report_progress_from_this_process_and_from_workers():
    for workers in (1, 2):
        events: list = []
        executor = LocalExecutor(workers, 1)
        for outcome in executor.map(
            reporting_item, [Item("a"), Item("b")], functools.partial(note, events)
        ):
            events.append((outcome.name, "done"))
        for name in ("a", "b"):
            mine = [f for n, f in events if n == name]
            assert mine == [0.25, 0.5, 0.75, "done"], (workers, events)


def test_summary_records_the_threads_items_ran_with():
    outcomes, _ = run_stage(LocalExecutor(1, 1), functools.partial(square_or_fail, 0), _items()[:2])
    assert summarise(outcomes, [])["threads"] == 1
    assert summarise([], ["s0"])["threads"] is None
