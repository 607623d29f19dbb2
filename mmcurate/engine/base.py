"""What every executor shares: work items, outcomes, one-line errors, thread pinning."""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mmcurate.errors import MmcurateError
from mmcurate.progress import progress_bar


class WorkItem(Protocol):
    """A unit of work and of checkpoint: each stage passes its own typed item with a name."""

    name: str


WorkFn = Callable[[Any], dict]


@dataclass(frozen=True)
class ExecutorConfig:
    """Where per-item work runs: a local process pool or Ray tasks, and its compute threads."""

    executor: str = "local"
    workers: int = 1
    threads: int = 1
    ray_address: str | None = None
    ray_gpus: float = 0.0


@dataclass
class Outcome:
    """The result of one work item: its stats when it succeeded, a one-line reason when not."""

    name: str
    ok: bool
    stats: dict = field(default_factory=dict)
    error: str | None = None


def one_line(exc: BaseException) -> str:
    """A user-facing one-line reason for an exception (no traceback)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, MmcurateError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def pin_threads(threads: int) -> None:
    """Fix the compute threads of this process, so float reductions do not vary between runs."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass


def run_item(fn: WorkFn, item: WorkItem, catch: type[Exception] = Exception) -> Outcome:
    """Run one item, turning a `catch` exception into a failed Outcome with a one-line reason."""
    start = time.perf_counter()
    try:
        stats = fn(item) or {}
    except catch as exc:
        return Outcome(item.name, False, {}, one_line(exc))
    stats.setdefault("seconds", round(time.perf_counter() - start, 3))
    return Outcome(item.name, True, stats, None)


class Executor(ABC):
    """Maps a per-item function over work items; outcomes arrive as items finish."""

    @abstractmethod
    def map(self, fn: WorkFn, items: Sequence[WorkItem]) -> Iterator[Outcome]:
        """Yield one Outcome per item, in completion order."""


class Progress:
    """A progress bar over work items that also shows samples/s from finished items' stats."""

    def __init__(self, total: int, desc: str, count_key: str = "rows") -> None:
        self.bar = progress_bar(total=total, desc=desc, unit="item")
        self.count_key = count_key
        self.samples = 0
        self.start = time.perf_counter()

    def update(self, outcome: Outcome) -> None:
        """Advance by one finished item."""
        self.samples += int(outcome.stats.get(self.count_key, 0) or 0)
        rate = self.samples / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.samples} samples, {rate:,.0f} samples/s")
        self.bar.update(1)

    def close(self) -> None:
        """Finish the bar."""
        self.bar.close()


def run_stage(
    executor: Executor,
    fn: WorkFn,
    items: Sequence[WorkItem],
    *,
    is_done: Callable[[Any], bool] = lambda item: False,
    desc: str = "work",
    count_key: str = "rows",
) -> tuple[list[Outcome], list[str]]:
    """Run the unfinished items; return their outcomes (sorted by name) and the skipped names."""
    done = [is_done(it) for it in items]
    todo = [it for it, d in zip(items, done) if not d]
    skipped = [it.name for it, d in zip(items, done) if d]
    progress = Progress(len(todo), desc, count_key)
    outcomes: list[Outcome] = []
    try:
        for outcome in executor.map(fn, todo):
            outcomes.append(outcome)
            progress.update(outcome)
    finally:
        progress.close()
    return sorted(outcomes, key=lambda o: o.name), skipped


def summarise(outcomes: Sequence[Outcome], skipped: Sequence[str]) -> dict[str, Any]:
    """Totals over a stage's outcomes: items done, failed (with reasons), samples, skip reasons."""
    reasons: dict[str, int] = {}
    for o in outcomes:
        for reason, count in (o.stats.get("skipped") or {}).items():
            reasons[reason] = reasons.get(reason, 0) + int(count)
    return {
        "done": [o.name for o in outcomes if o.ok],
        "already_done": list(skipped),
        "failed": {o.name: o.error for o in outcomes if not o.ok},
        "rows": sum(int(o.stats.get("rows", 0) or 0) for o in outcomes if o.ok),
        "read": sum(int(o.stats.get("read", 0) or 0) for o in outcomes if o.ok),
        "skipped": dict(sorted(reasons.items())),
    }
