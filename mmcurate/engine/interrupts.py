"""SIGINT and SIGTERM: stop within seconds, keep every finished item, leave no process behind.

A command runs inside `handling()`: the first signal raises `Interrupted` in the main thread
(a BaseException, so no stage's `except Exception` swallows it); the executors kill their
workers as it unwinds, and the CLI prints one line and exits 128 + the signal. A second signal
while stopping, or a stop that takes longer than `GRACE_SECONDS`, ends the command at once:
every descendant process is killed and the process exits without running any more Python.

Worker processes start with both signals blocked (`signals_blocked` around their spawn), so a
terminal's Ctrl-C, which reaches the whole process group, never prints anything from them:
the parent alone decides, and kills them.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mmcurate.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_SECONDS = 8.0
RESUME = "run the same command again to resume"

_state: dict = {
    "armed": False,
    "pid": None,
    "stopping": False,
    "told": False,
    "done": None,
    "total": None,
    "deferred": False,
    "pending": None,
}


def exit_code(signum: int) -> int:
    """The shell's exit code for a process ended by a signal: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


def set_progress(done: int, total: int) -> None:
    """Record how many shards of the running stage are done (for the interrupted line)."""
    _state["done"], _state["total"] = int(done), int(total)


def message() -> str:
    """The one line an interrupted command prints."""
    if _state["total"] is None:
        return f"interrupted: no shard started; {RESUME}"
    return f"interrupted: {_state['done']} of {_state['total']} shards done; {RESUME}"


def tell() -> None:
    """Print the interrupted line once, whatever path the stop takes."""
    if not _state["told"]:
        _state["told"] = True
        os.write(2, (message() + "\n").encode())


def descendants(pid: int | None = None) -> list[int]:
    """Every live descendant of a process (default: this one), read from /proc."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int | None = None, spare: tuple[int, ...] = ()) -> None:
    """SIGKILL every descendant of a process (and the process itself when it is not this one),
    except the `spare` pids and their descendants."""
    keep = set(spare)
    for p in spare:
        keep.update(descendants(p))
    victims = [p for p in descendants(pid) if p not in keep]
    if pid is not None and pid != os.getpid():
        victims.insert(0, pid)
    for victim in victims:
        try:
            os.kill(victim, signal.SIGKILL)
        except OSError:
            pass


def _tracker_pid() -> int | None:
    """The multiprocessing resource tracker of this process: it exits by itself once every
    process holding its pipe has exited, after freeing the semaphores, so it is left alone."""
    tracker = sys.modules.get("multiprocessing.resource_tracker")
    pid = getattr(getattr(tracker, "_resource_tracker", None), "_pid", None)
    return pid if isinstance(pid, int) else None


def kill_children() -> None:
    """Kill every process this command started, except the resource tracker."""
    tracker = _tracker_pid()
    kill_tree(spare=(tracker,) if tracker else ())


def hard_stop(signum: int) -> None:
    """End the command now: print the line, kill every descendant, exit without unwinding."""
    tell()
    kill_tree()
    os._exit(exit_code(signum))


def _handler(signum: int, frame) -> None:
    if _state["pid"] not in (None, os.getpid()):
        return  # a forked child (a DataLoader worker): the command's process decides
    if not _state["armed"] or _state["stopping"]:
        hard_stop(signum)  # before the command is ready, or a second signal while stopping
    _state["stopping"] = True
    timer = threading.Timer(GRACE_SECONDS, hard_stop, (signum,))
    timer.daemon = True
    timer.start()
    if _state["deferred"]:
        _state["pending"] = signum  # raised by `check()`: never from inside a C extension
        return
    raise Interrupted(signum)


def check() -> None:
    """Raise the interrupt a `deferred()` block recorded, if any."""
    signum, _state["pending"] = _state["pending"], None
    if signum is not None:
        raise Interrupted(signum)


@contextmanager
def deferred() -> Iterator[None]:
    """A block whose calls (Ray's Cython) must not see an exception raised inside them: a
    signal is recorded, and `check()` between calls raises it."""
    before = _state["deferred"]
    _state["deferred"] = True
    try:
        yield
    finally:
        _state["deferred"] = before
    check()


def install_early() -> None:
    """Before the command is ready (its imports): a signal ends the process at once, with the
    interrupted line and nothing else."""
    if threading.current_thread() is threading.main_thread():
        _state["pid"] = os.getpid()
        for sig in SIGNALS:
            signal.signal(sig, _handler)


def reinstall() -> None:
    """Take the signals back after a library (Ray) installed its own handlers."""
    if _state["armed"] and threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _handler)


@contextmanager
def handling() -> Iterator[None]:
    """Run a command with SIGINT/SIGTERM raising `Interrupted`; restore the old handlers after.

    After an interrupt the signals are ignored instead: the process is ending, and the
    interpreter's own shutdown would otherwise let a late second Ctrl-C kill it mid-exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    _state.update(armed=True, pid=os.getpid(), stopping=False, told=False, done=None, total=None)
    try:
        for sig in SIGNALS:
            signal.signal(sig, _handler)
        yield
    finally:
        _state["armed"] = False
        for sig, old in saved.items():
            signal.signal(sig, signal.SIG_IGN if _state["stopping"] else old)


def stop(exc: Interrupted) -> int:
    """After an interrupt has unwound: kill what is left, print the line; the exit code.

    With Ray connected, the process ends here: the local instance it started is killed with
    the other children, and Ray's own shutdown at exit would wait on it for seconds."""
    kill_children()
    tell()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code(exc.signum))
    return exit_code(exc.signum)


@contextmanager
def signals_blocked() -> Iterator[None]:
    """Block SIGINT and SIGTERM in this thread while processes are spawned: they inherit the
    mask and never act on those signals; a signal to this process waits until the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
