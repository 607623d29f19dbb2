"""One run per output: a lock file made by exclusive create, kept fresh by a heartbeat.

`O_CREAT | O_EXCL` is atomic on local file systems and on NFS (v3 and later), where `flock`
may be a no-op; so the lock is a file `.mmcurate.lock` in the output directory (beside an
output file: `.<name>.mmcurate.lock`) holding the command, pid, host and start time, and a
thread touches it every `HEARTBEAT_SECONDS`.

A holder is dead when, on this host, its pid is gone (or is another process now: the pid's
start time differs); on another host, when the lock's heartbeat is older than
`STALE_SECONDS`. A dead holder's lock is taken over with one warning. A live holder's lock
refuses the run (UsageError, exit 2). `--force-unlock` takes any lock: for the rare case the
check cannot decide (a holder on another host whose clock or file system stalls).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from mmcurate.data.atomic import disk_full, read_json_dict
from mmcurate.errors import UsageError

LOCK_NAME = ".mmcurate.lock"
HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 60.0
FILE_SUFFIXES = (".npy", ".pt", ".json", ".html")


def lock_path(out: str | os.PathLike) -> Path:
    """Where the lock of an output lives: inside an output directory, beside an output file."""
    path = Path(out)
    if not path.is_dir() and path.suffix in FILE_SUFFIXES:
        return path.parent / f".{path.name}{LOCK_NAME}"
    return path / LOCK_NAME


def _start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (None when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def _alive_here(pid: int, ticks: int | None) -> bool:
    """True when the pid runs on this host and is the same process (same start time)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _start_ticks(pid)
    return ticks is None or now is None or now == ticks


def holder_line(holder: dict) -> str:
    """`COMMAND (pid P on HOST, started T)`."""
    return (
        f"{holder.get('command', '?')} (pid {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, started {holder.get('started', '?')})"
    )


def is_dead(holder: dict | None, age: float) -> bool:
    """Whether a lock's holder is certainly gone: its pid on this host, else a stale heartbeat."""
    if holder is None:
        return age > STALE_SECONDS  # unreadable: a writer died mid-create, or is creating now
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
        return not _alive_here(pid, holder.get("ticks"))
    return age > STALE_SECONDS


class OutputLock:
    """A held lock: its file, its record, and the heartbeat thread keeping it fresh."""

    def __init__(self, path: Path, record: dict, created: list[Path]) -> None:
        self.path = path
        self.record = record
        self.created = created
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="mmcurate-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        """Stop the heartbeat; remove the file if it is still this run's."""
        self._stop.set()
        if read_json_dict(self.path) == self.record:
            self.path.unlink(missing_ok=True)
        for folder in self.created:  # a refused command leaves no empty directory behind
            try:
                folder.rmdir()
            except OSError:
                return


def _create(path: Path, record: dict) -> bool:
    """Exclusive create: True when this run now holds the lock."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as exc:
        refused = UsageError(f"cannot write in {path.parent}: {exc.strerror or exc}")
        raise disk_full(path, exc) or refused from None
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(record, sort_keys=True))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise disk_full(path, exc) or exc from None
    return True


def _holder(path: Path) -> tuple[dict | None, float]:
    """The lock's record (None when unreadable) and its heartbeat age in seconds."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None, -1.0
    return read_json_dict(path), age


def acquire(out: str | os.PathLike, command: str, force: bool = False) -> OutputLock:
    """Take the lock of an output, or refuse (UsageError naming the holder) while it runs."""
    path = lock_path(out)
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": command,
        "pid": os.getpid(),
        "ticks": _start_ticks(os.getpid()),
        "host": socket.gethostname(),
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }
    for _ in range(5):
        if _create(path, record):
            return OutputLock(path, record, created)
        holder, age = _holder(path)
        if age < 0:
            continue  # released in between: try again
        if holder is None and age < 1.0:
            time.sleep(0.2)  # being written by its creator
            continue
        if force or is_dead(holder, age):
            who = holder_line(holder) if holder else "an unreadable lock"
            how = "forced" if force else "dead run"
            warnings.warn(f"taking over the lock of {out} from {who} ({how})", stacklevel=2)
            if _holder(path)[0] == holder:
                path.unlink(missing_ok=True)
            continue
        raise UsageError(
            f"{out} is in use by {holder_line(holder or {})}; wait for it, or use "
            "--force-unlock if that run is certainly gone"
        )
    raise UsageError(f"could not take the lock {path}: other runs keep taking it")


@contextmanager
def locked(
    out: str | os.PathLike, command: str, force: bool = False
) -> Iterator[OutputLock | None]:
    """Hold the output's lock for the block (none when the output path is a file where a
    directory is expected, or sits under one, or is a file in a missing directory: the
    command itself decides about those)."""
    where = lock_path(out).parent
    file_output = where != Path(out)
    if any(p.is_file() for p in (where, *where.parents)) or (file_output and not where.is_dir()):
        yield None
        return
    lock = acquire(out, command, force)
    try:
        yield lock
    finally:
        lock.release()
