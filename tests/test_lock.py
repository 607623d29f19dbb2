"""One run per output, with two real processes: a second run on the same output is refused at
once naming the holder; a dead holder's lock is taken over with one warning; --force-unlock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from faults.figures import FIGURES, tally_markers
from test_kill_resume import ENV, _command, _score_store, _snapshot

from mmcurate.data.lock import LOCK_NAME, STALE_SECONDS, acquire, lock_path
from mmcurate.errors import UsageError

FLAGS = ["--metric", "negclip", "--k", "10", "--batch-size", "256", "--window", "1"]
STEMS, ROWS = 10, 800


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lock") / "store"
    _score_store(root, STEMS, ROWS, 64)
    return root


def _wait_for(path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_second_run_on_same_output_refused(store, tmp_path):
    out = tmp_path / "scores"
    args = _command("score", store, "--out", out, *FLAGS)
    # K = 200 keeps the first run busy (~11 s of work) while the second starts (~4 s)
    slow = _command("score", store, "--out", out, *FLAGS[:3], "200", *FLAGS[4:])
    first = subprocess.Popen(
        slow, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, text=True
    )
    _wait_for(out / LOCK_NAME)
    start = time.monotonic()
    second = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
    refused_in = time.monotonic() - start
    still_running = first.poll() is None
    _, err = first.communicate(timeout=600)
    lines = second.stderr.strip().splitlines()
    survived = (
        first.returncode == 0
        and second.returncode == 2
        and still_running
        and len(lines) == 1
        and f"pid {first.pid} on {socket.gethostname()}" in lines[0]
        and not (out / LOCK_NAME).exists()
    )
    tally = tally_markers(STEMS * ROWS, sorted(out.glob("*.done.json")))
    FIGURES.record_fault("concurrent start", survived, tally)
    assert still_running, "the first run ended before the second started"
    assert first.returncode == 0, err
    assert second.returncode == 2, second.stderr
    assert len(lines) == 1, second.stderr
    assert "score" in lines[0] and "started" in lines[0], lines[0]
    assert f"pid {first.pid} on {socket.gethostname()}" in lines[0], lines[0]
    assert refused_in < 30
    assert not (out / LOCK_NAME).exists(), "the lock outlived its run"
    assert tally.lost == 0


def test_dead_runs_lock_taken_over_with_one_warning(store, tmp_path):
    out, ref = tmp_path / "scores", tmp_path / "ref"
    subprocess.run(_command("score", store, "--out", ref, *FLAGS), env=ENV, check=True)
    args = _command("score", store, "--out", out, *FLAGS)
    victim = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    _wait_for(out / LOCK_NAME)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert (out / LOCK_NAME).exists()
    rerun = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600)
    warned = [x for x in rerun.stderr.splitlines() if "taking over the lock" in x]
    survived = rerun.returncode == 0 and len(warned) == 1 and _snapshot(out) == _snapshot(ref)
    tally = tally_markers(STEMS * ROWS, sorted(out.glob("*.done.json")))
    FIGURES.record_fault("stale lock (dead run)", survived, tally)
    assert rerun.returncode == 0, rerun.stderr
    assert len(warned) == 1 and f"pid {victim.pid}" in warned[0], rerun.stderr
    assert _snapshot(out) == _snapshot(ref)


def _foreign_lock(out: Path, age: float) -> Path:
    """A lock of a run on another host whose heartbeat is `age` seconds old."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": "score", "pid": 1, "host": "elsewhere", "started": "then"}
    path.write_text(json.dumps(record))
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_other_hosts_lock_by_heartbeat_age(tmp_path):
    _foreign_lock(tmp_path / "fresh", 1.0)
    with pytest.raises(UsageError, match="pid 1 on elsewhere"):
        acquire(tmp_path / "fresh", "score")
    _foreign_lock(tmp_path / "stale", STALE_SECONDS + 5)
    with pytest.warns(UserWarning, match="taking over the lock"):
        lock = acquire(tmp_path / "stale", "score")
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock.path.exists()


def test_force_unlock_takes_a_live_lock(tmp_path, corpus3):
    _foreign_lock(tmp_path / "store", 1.0)
    args = ["embed", *map(str, corpus3), "--out", str(tmp_path / "store"), "--model"]
    args += ["open_clip:mmc-tiny", "--decode-workers", "0"]
    refused = subprocess.run(_command(*args), capture_output=True, text=True, env=ENV)
    assert refused.returncode == 2 and "--force-unlock" in refused.stderr
    forced = subprocess.run(
        _command(*args, "--force-unlock"), capture_output=True, text=True, env=ENV
    )
    assert forced.returncode == 0, forced.stderr
    assert "taking over the lock" in forced.stderr
    assert len(list((tmp_path / "store").glob("*.done.json"))) == 3


def test_output_file_lock_lives_beside_it(tmp_path):
    assert lock_path(tmp_path / "subset.npy") == tmp_path / f".subset.npy{LOCK_NAME}"
    assert lock_path(tmp_path / "scores") == tmp_path / "scores" / LOCK_NAME
