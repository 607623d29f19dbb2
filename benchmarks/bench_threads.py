"""`mmcurate score` with default flags against --threads 1: how many cores a run keeps busy.

    python benchmarks/bench_threads.py [--pairs 65536 --d 256 --batch 8192 --k 1]

Each run is a fresh `python -m mmcurate score` process; the table gives its wall time, its CPU
time (user + sys, from the child's rusage), their ratio, and the busy ratio, which adds the
time its threads waited for a CPU (from /proc schedstat): on a shared machine the first ratio
shows how many cores the run was given, the second how many it kept asking for. Best of >= 3
runs by wall time.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import REPEATS, best_of, header


def make_store(root: Path, pairs: int, d: int, stems: int = 4) -> None:
    """A float16 store of random pairs in `stems` stems."""
    import pyarrow as pa

    from mmcurate.data.store import write_stem

    rng = np.random.default_rng(7)
    per = pairs // stems
    for s in range(stems):
        img = rng.standard_normal((per, d)).astype(np.float32)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt = img + rng.uniform(0.2, 2.0, (per, 1)) * rng.standard_normal((per, d)) / d**0.5
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        uids = [f"{s:016x}{j:016x}" for j in range(per)]
        arrays = {"img": img.astype(np.float16), "txt": txt.astype(np.float16)}
        write_stem(root, f"{s:05d}", pa.table({"uid": uids}), arrays, {})


def run(store: Path, out: Path, args: list[str]) -> dict:
    """One `mmcurate score` process: wall, CPU and busy (CPU + waiting for a CPU) seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmcurate", "score", str(store), "--out", str(out), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen: dict[str, tuple[int, int]] = {}
    while proc.poll() is None:
        for task in Path(f"/proc/{proc.pid}/task").glob("*"):
            try:
                ran, waited, _ = map(int, (task / "schedstat").read_text().split())
            except (OSError, ValueError):
                continue
            seen[task.name] = (ran, waited)
        time.sleep(0.05)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"mmcurate score exited with {proc.returncode}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    busy = sum(r + w for r, w in seen.values()) / 1e9
    return {"wall": wall, "cpu": cpu, "busy": busy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=65536)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=REPEATS)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(header(f"mmcurate score, default threads vs --threads 1 ({cores} usable cores)"))
    score_args = ["--metric", "negclip", "--batch-size", str(args.batch), "--k", str(args.k)]
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        make_store(store, args.pairs, args.d)
        rows = []
        outs = (Path(tmp) / f"out{i}" for i in range(2 * args.repeat))
        for label, extra in (("default (auto)", []), ("--threads 1", ["--threads", "1"])):
            r = best_of(
                lambda extra=extra: run(store, next(outs), score_args + extra),
                key=lambda r: r["wall"],
                repeats=args.repeat,
            )
            rows.append((label, r))
    print(
        f"\n{args.pairs:,} pairs, d={args.d}, negclip B={args.batch}, K={args.k}, one local "
        f"worker\n\n| run | wall s | CPU s | CPU / wall | busy / wall |\n|---|---:|---:|---:|---:|"
    )
    for label, r in rows:
        print(
            f"| {label} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['cpu'] / r['wall']:.2f} | "
            f"{r['busy'] / r['wall']:.2f} |"
        )


if __name__ == "__main__":
    main()
