"""What every executor shares: work items, outcomes, one-line errors, compute threads."""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from mmcurate.engine.interrupts import set_progress
from mmcurate.engine.report import ProgressSink, reporting
from mmcurate.errors import Interrupted, MmcurateError, UsageError
from mmcurate.progress import progress_bar


class WorkItem(Protocol):
    """A unit of work and of checkpoint: each stage passes its own typed item with a name."""

    name: str


WorkFn = Callable[[Any], dict]
AUTO_THREADS = "auto"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class ExecutorConfig:
    """Where per-item work runs: a local process pool or Ray tasks, and its compute threads
    (`auto`: the usable cores divided among the workers)."""

    executor: str = "local"
    workers: int = 1
    threads: int | str = AUTO_THREADS
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


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), not every core of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - platforms without sched_getaffinity
        return os.cpu_count() or 1


def resolve_threads(threads: int | str | None, workers: int, cores: int | None = None) -> int:
    """Compute threads per worker: an integer >= 1 as given, or `auto` = cores // workers."""
    if threads is None or str(threads).strip().lower() == AUTO_THREADS:
        return max(1, (cores or usable_cores()) // max(1, int(workers)))
    try:
        value = int(str(threads).strip())
    except ValueError:
        raise UsageError(f"--threads must be auto or an integer >= 1, got {threads!r}") from None
    if value < 1:
        raise UsageError(f"--threads must be auto or an integer >= 1, got {threads!r}")
    return value


def pin_threads(threads: int) -> None:
    """Fix the compute threads of this process, so float reductions do not vary between runs."""
    for var in THREAD_VARS:
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass


@contextmanager
def pinned(threads: int) -> Iterator[None]:
    """Run the block with `threads` compute threads, then give the process back its own."""
    import torch

    before_env = {var: os.environ.get(var) for var in THREAD_VARS}
    before = torch.get_num_threads()
    pin_threads(threads)
    try:
        yield
    finally:
        pin_threads(before)
        for var, value in before_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def cuda_visible() -> bool:
    """True when this process sees a CUDA device."""
    import torch

    return torch.cuda.is_available()


def wants_cuda(device: str | None) -> bool:
    """True for a device name that requires CUDA (`cuda`, `cuda:1`)."""
    return str(device or "").startswith("cuda")


def run_item(fn: WorkFn, item: WorkItem, catch: type[Exception] = Exception) -> Outcome:
    """Run one item, turning a `catch` exception into a failed Outcome with a one-line reason.

    The stats record the compute threads the item ran with.
    """
    import torch

    start = time.perf_counter()
    try:
        stats = fn(item) or {}
    except catch as exc:
        return Outcome(item.name, False, {}, one_line(exc))
    stats.setdefault("seconds", round(time.perf_counter() - start, 3))
    stats.setdefault("threads", torch.get_num_threads())
    return Outcome(item.name, True, stats, None)


def run_reported(
    fn: WorkFn, item: WorkItem, sink: ProgressSink | None, catch: type[Exception] = Exception
) -> Outcome:
    """`run_item` with progress reports from inside the item sent to `sink`."""
    with reporting(sink, item.name):
        return run_item(fn, item, catch)


class Executor(ABC):
    """Maps a per-item function over work items; outcomes arrive as items finish."""

    threads: int

    @abstractmethod
    def map(
        self, fn: WorkFn, items: Sequence[WorkItem], on_progress: ProgressSink | None = None
    ) -> Iterator[Outcome]:
        """Yield one Outcome per item, in completion order; `on_progress(name, fraction)` is
        called in this process when an item reports how far it is (`report_progress`)."""

    def check_device(self, device: str | None) -> None:
        """Refuse at once (UsageError) a device the work items could not get."""
        if wants_cuda(device) and not cuda_visible():
            raise UsageError(f"--device {device}: no CUDA device is visible to this process")

    def cpu_only(self) -> Executor:
        """This executor for a stage that never uses a GPU (it holds none on Ray)."""
        return self

    def task_device(self, device: str | None) -> str:
        """`cuda` or `cpu`: the kind of device the work items will compute on."""
        auto = device in (None, "auto")
        return "cuda" if wants_cuda(device) or (auto and cuda_visible()) else "cpu"


class Progress:
    """A progress bar over work items that moves within an item as it reports, and shows
    samples/s from finished items' stats."""

    def __init__(self, total: int, desc: str, count_key: str = "rows") -> None:
        self.bar = progress_bar(total=total, desc=desc, unit="item", fractional=True)
        self.count_key = count_key
        self.samples = 0
        self.start = time.perf_counter()
        self.partial: dict[str, float] = {}
        self.finished: set[str] = set()

    def advance(self, name: str, fraction: float) -> None:
        """An unfinished item reports it is `fraction` done; the bar moves by what is new."""
        if name in self.finished:
            return
        gain = max(0.0, min(1.0, fraction) - self.partial.get(name, 0.0))
        if gain > 0:
            self.partial[name] = self.partial.get(name, 0.0) + gain
            self.bar.update(gain)

    def update(self, outcome: Outcome) -> None:
        """Advance by the rest of one finished item."""
        self.finished.add(outcome.name)
        self.samples += int(outcome.stats.get(self.count_key, 0) or 0)
        rate = self.samples / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.samples} samples, {rate:,.0f} samples/s", refresh=False)
        self.bar.update(1.0 - self.partial.pop(outcome.name, 0.0))

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
    """Run the unfinished items; return their outcomes (sorted by name) and the skipped names.

    The count of done items is kept up to date for the line an interrupted command prints."""
    done = [is_done(it) for it in items]
    todo = [it for it, d in zip(items, done) if not d]
    skipped = [it.name for it, d in zip(items, done) if d]
    set_progress(len(skipped), len(items))
    progress = Progress(len(todo), desc, count_key)
    outcomes: list[Outcome] = []
    results = executor.map(fn, todo, progress.advance)
    try:
        for outcome in results:
            outcomes.append(outcome)
            progress.update(outcome)
            set_progress(len(skipped) + sum(o.ok for o in outcomes), len(items))
    except Interrupted:
        progress.bar.leave = False
        _close(results)
        set_progress(sum(bool(is_done(it)) for it in items), len(items))  # what is on disk
        raise
    finally:
        _close(results)
        progress.close()
    return sorted(outcomes, key=lambda o: o.name), skipped


def _close(results: Iterator[Outcome]) -> None:
    """Stop an executor's generator now (its workers are killed), not when it is collected."""
    close = getattr(results, "close", None)
    if close is not None:
        close()


def summarise(outcomes: Sequence[Outcome], skipped: Sequence[str]) -> dict[str, Any]:
    """Totals over a stage's outcomes: items done, failed (with reasons), samples, skip reasons,
    and the compute threads the items ran with (None when every item was already done)."""
    reasons: dict[str, int] = {}
    for o in outcomes:
        for reason, count in (o.stats.get("skipped") or {}).items():
            reasons[reason] = reasons.get(reason, 0) + int(count)
    threads = sorted({int(o.stats["threads"]) for o in outcomes if o.ok and "threads" in o.stats})
    return {
        "done": [o.name for o in outcomes if o.ok],
        "already_done": list(skipped),
        "failed": {o.name: o.error for o in outcomes if not o.ok},
        "rows": sum(int(o.stats.get("rows", 0) or 0) for o in outcomes if o.ok),
        "read": sum(int(o.stats.get("read", 0) or 0) for o in outcomes if o.ok),
        "skipped": dict(sorted(reasons.items())),
        "threads": threads[0] if len(threads) == 1 else (threads or None),
    }
