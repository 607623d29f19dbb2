"""SIGKILL `mmcurate embed` and `mmcurate score` at 10 seeded random points each, resume every
time, and require the final store and sidecars to be byte-identical to an uninterrupted run.

Most kills wait for the run's first new output file, then a seeded random delay of up to 1.5
times the time one stem took in the uninterrupted run, so they land mid-work on any machine;
every third kill instead fires the moment a temporary file of a given kind (parquet, npz, done
marker) appears, so it lands inside that write. The process must still be running and
unfinished stems must remain. After every kill, no file under a final name may be truncated,
every stem finished so far must already equal the uninterrupted run, and no child process
(DataLoader decode worker) may be left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from faults.figures import FIGURES
from faults.harness import TEMP_NAME, TINY, unparseable_files

from mmcurate.data.store import write_stem
from mmcurate.demo.corpus import generate_corpus

KILLS = 10
SEED = 20240607
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}


def _command(*args: object) -> list[str]:
    return [sys.executable, "-m", "mmcurate", *map(str, args)]


def _session(sid: int) -> list[int]:
    """Live processes of a session (the killed command and anything it left behind)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def _reap_orphans(sid: int, grace: float = 45.0) -> int:
    """Wait for the killed command's children to exit (a decode worker notices its parent is
    gone within its 5 s status interval; one still importing torch takes longer); kill (and
    count) any that do not."""
    deadline = time.monotonic() + grace
    while _session(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _session(sid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return len(left)


def _finished(out: Path, marker: str) -> set[str]:
    return {p.name[: -len(marker)] for p in out.glob(f"*{marker}")} if out.exists() else set()


def _snapshot(out: Path) -> dict[str, object]:
    """Final-named files: bytes, and JSON without the wall-clock `seconds`."""
    snap: dict[str, object] = {}
    for path in sorted(out.iterdir()):
        if TEMP_NAME.match(path.name) or not path.is_file():
            continue
        if path.name.endswith(".json"):
            data = json.loads(path.read_text())
            data.pop("seconds", None)
            snap[path.name] = data
        else:
            snap[path.name] = path.read_bytes()
    return snap


def _temp_for(name: str, suffix: str) -> bool:
    """True for atomic_path's temporary name of a final name ending in `suffix`."""
    return bool(TEMP_NAME.match(name)) and name[1:].rsplit(".", 2)[0].endswith(suffix)


def _run_to_end(args: list[str], out: Path, log: Path) -> float:
    """Run the command to completion; returns the seconds from its first new output to exit."""
    before = set(os.listdir(out)) if out.exists() else set()
    first = None
    with open(log, "ab") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=ENV)
        while proc.poll() is None:
            if first is None and out.exists() and set(os.listdir(out)) - before:
                first = time.monotonic()
            time.sleep(0.005)
    assert proc.returncode == 0, log.read_text()[-2000:]
    assert "Traceback" not in log.read_text()
    return time.monotonic() - (first or time.monotonic())


def _kill_midway(
    args: list[str], out: Path, delay: float, log: Path, marker: str, in_write: str | None
) -> dict:
    """Start the command, wait for its first new output (with `in_write`, a new temporary
    file for a final name ending so), sleep `delay`, SIGKILL it."""
    before = set(os.listdir(out)) if out.exists() else set()
    done_before = _finished(out, marker)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            args, stdout=fh, stderr=subprocess.STDOUT, env=ENV, start_new_session=True
        )
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        new = set(os.listdir(out)) - before if out.exists() else set()
        if in_write is None and new or any(_temp_for(n, in_write) for n in new if in_write):
            break
        time.sleep(0.0005 if in_write else 0.005)
    time.sleep(delay)
    alive = proc.poll() is None
    if alive:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_after = _finished(out, marker)
    names = os.listdir(out)
    return {
        "alive": alive,
        "in_write": in_write,
        "done_before": len(done_before),
        "done_after": len(done_after),
        "temp_files": sum(bool(TEMP_NAME.match(n)) for n in names),
        "unmarked": len({n.split(".")[0] for n in names if not TEMP_NAME.match(n)} - done_after),
        "orphans": _reap_orphans(proc.pid),
    }


def _kill_and_resume(
    command: str,
    args: list[str],
    out: Path,
    ref: Path,
    tmp: Path,
    stems: int,
    marker: str,
    per_stem: float,
    writes: tuple[str, ...],
) -> None:
    """Ten seeded kills, each resumed by the next run; then a final run; compare with ref."""
    rng = np.random.default_rng([SEED, len(command)])
    reference = _snapshot(ref)
    kills = []
    for i in range(KILLS):
        in_write = writes[(i // 3) % len(writes)] if i % 3 == 2 else None
        delay = 0.0 if in_write else float(rng.uniform(0, 1.5 * per_stem))
        kill = _kill_midway(args, out, delay, tmp / f"kill{i}.log", marker, in_write)
        kill["truncated"] = unparseable_files(out)
        now = _snapshot(out)
        kill["differs"] = sorted(
            name
            for name in now
            if not TEMP_NAME.match(name)
            and name.endswith((".parquet", ".npz"))
            and now[name] != reference.get(name)
            and (name.split(".")[0] in _finished(out, marker))
        )
        kills.append(kill)
    _run_to_end(args, out, tmp / "final.log")
    identical = _snapshot(out) == reference
    for kill in kills:
        survived = (
            identical
            and kill["alive"]
            and not kill["truncated"]
            and not kill["differs"]
            and not kill["orphans"]
            and kill["done_after"] < stems
        )
        FIGURES.record_kill(command, survived)
    report = "\n".join(
        f"kill {i} ({'writing ' + k['in_write'] if k['in_write'] else 'mid-work'}): "
        f"alive={k['alive']}, "
        f"stems done {k['done_before']}->{k['done_after']} of {stems}, files of unfinished "
        f"stems {k['unmarked']}, temp files {k['temp_files']}, orphans {k['orphans']}"
        for i, k in enumerate(kills)
    )
    print(f"\n{command}:\n{report}")
    for i, kill in enumerate(kills):
        assert kill["alive"], f"kill {i} came after the run had finished:\n{report}"
        assert kill["done_after"] < stems, f"kill {i} did not land mid-work:\n{report}"
        assert not kill["truncated"], kill["truncated"]
        assert not kill["differs"], f"kill {i}: finished stems differ: {kill['differs']}"
        assert not kill["orphans"], f"kill {i} left {kill['orphans']} process(es) running"
    assert sum(k["done_after"] > k["done_before"] for k in kills) >= KILLS // 2, report
    assert identical, sorted(
        n for n in set(reference) | set(_snapshot(out)) if reference.get(n) != _snapshot(out).get(n)
    )


@pytest.mark.slow
def test_embed_survives_ten_sigkills(tmp_path):
    shards = generate_corpus(tmp_path / "src", n_shards=40, per_shard=32, seed=7)
    common = ["--model", TINY, "--batch-size", "8", "--decode-workers", "1"]
    ref, out = tmp_path / "ref", tmp_path / "store"
    work = _run_to_end(_command("embed", *shards, "--out", ref, *common), ref, tmp_path / "ref.log")
    args = _command("embed", *shards, "--out", out, *common)
    per_stem = work / len(shards)
    writes = (".parquet", ".npz", ".done.json")
    _kill_and_resume("embed", args, out, ref, tmp_path, len(shards), ".done.json", per_stem, writes)


def _score_store(root: Path, stems: int, rows: int, dim: int) -> None:
    rng = np.random.default_rng(11)
    import pyarrow as pa

    for s in range(stems):
        stem = f"{s:05d}"
        img = rng.standard_normal((rows, dim))
        txt = img + rng.standard_normal((rows, dim))
        arrays = {
            k: (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)
            for k, v in (("img", img), ("txt", txt))
        }
        uids = [f"{rng.integers(2**63):016x}{rng.integers(2**63):016x}" for _ in range(rows)]
        meta = pa.table({"uid": uids, "key": [str(i) for i in range(rows)]})
        write_stem(root, stem, meta, arrays, {"logit_scale": 100.0})


@pytest.mark.slow
def test_score_survives_ten_sigkills(tmp_path):
    store = tmp_path / "store"
    stems = 48
    _score_store(store, stems, 1500, 64)
    target = tmp_path / "target.npy"
    np.save(target, np.random.default_rng(3).standard_normal((300, 64)).astype(np.float32))
    common = [
        "--batch-size",
        "512",
        "--k",
        "10",
        "--window",
        "1",
        "--metric",
        "clipscore",
        "--metric",
        "negclip",
        "--metric",
        "normsim",
        "--target",
        target,
        "--p",
        "inf",
        "--p",
        "2",
        "--device",
        "cpu",
    ]
    ref, out = tmp_path / "ref", tmp_path / "scores"
    work = _run_to_end(_command("score", store, "--out", ref, *common), ref, tmp_path / "ref.log")
    args = _command("score", store, "--out", out, *common)
    writes = (".scores.parquet", ".done.json")
    _kill_and_resume("score", args, out, ref, tmp_path, stems, ".done.json", work / stems, writes)
