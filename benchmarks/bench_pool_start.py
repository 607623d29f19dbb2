"""How long a local pool of 2 workers takes to start and run trivial items: workers forked from
the fork server (mmcurate's) against spawned ones (the baseline), in one run.

    python benchmarks/bench_pool_start.py [--pools 5]

A command runs one pool per stage; each worker unpickles its work function, which imports the
stage's modules (torch among them). The first pool of a command also starts the fork server.
Each mode runs in a fresh process: first pool, then the median of the later ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from harness import header


@dataclass(frozen=True)
class Item:
    name: str


def touch(item: Item) -> dict:
    """A work item that needs what a real one imports: the evaluate stage and torch."""
    import mmcurate.distill.evaluate_stage  # noqa: F401

    return {"rows": 1}


def measure(mode: str, pools: int) -> list[float]:
    """Seconds per pool (2 workers, 4 items) in this process, `mode` fork server or spawn."""
    import multiprocessing as mp

    from mmcurate.engine import LocalExecutor, local

    if mode == "spawn":
        local.pool_context = lambda: mp.get_context("spawn")
    executor = LocalExecutor(workers=2, threads=1)
    seconds = []
    for _ in range(pools):
        start = time.perf_counter()
        outcomes = list(executor.map(touch, [Item(str(i)) for i in range(4)]))
        assert all(o.ok for o in outcomes), outcomes
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", type=int, default=5)
    parser.add_argument("--mode", choices=["forkserver", "spawn"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.pools)))
        return
    print(header("local pool start: fork server against spawn (2 workers, 4 items per pool)", 1))
    rows = {}
    for mode in ("forkserver", "spawn"):
        cmd = [sys.executable, __file__, "--mode", mode, "--pools", str(args.pools)]
        rows[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout)
    print("| workers | first pool s | later pools s (median) | later pools vs spawn |")
    print("|---|---:|---:|---:|")
    spawn_later = statistics.median(rows["spawn"][1:])
    for mode, seconds in rows.items():
        later = statistics.median(seconds[1:])
        print(f"| {mode} | {seconds[0]:.2f} | {later:.2f} | {later / spawn_later:.2f}× |")


if __name__ == "__main__":
    main()
