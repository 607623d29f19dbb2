"""Embed throughput per CPU core: the Ray executor vs the local executor on the same shards.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ray.py [--shards 8] [--per-shard 500]
(progress bars go to stderr, the table to stdout).
Every run embeds the same JPEG shards with the same encoder, batch size and one compute thread
per task; Ray runs on a local cluster of `--cpus` CPUs started here (its start-up time is
reported apart). Ratios are against the local executor with one worker, measured in this run.
The first pass of each executor warms its worker processes (model load); the table is the
best of the next >= 3 passes, the steady state of a long run over many shards. The 1-minute
load average at the start is printed first.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from harness import REPEATS, best_of, header

from mmcurate.data.shards import ShardItem
from mmcurate.demo import generate_corpus
from mmcurate.embed.stage import EmbedConfig, embed_shard
from mmcurate.engine import Executor, LocalExecutor, run_stage


def memory_mb() -> dict[str, int]:
    """Resident and private (anonymous) memory of this process, from /proc (Linux)."""
    fields = {}
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if parts[0] in ("Rss:", "Anonymous:"):
                fields[parts[0][:-1].lower()] = int(parts[1]) // 1024
    return fields


def embed_with_memory(config: EmbedConfig, out: str, item: ShardItem) -> dict:
    """embed_shard, plus the process id and its memory after the shard."""
    stats = embed_shard(config, out, item)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return {**stats, "pid": os.getpid(), "peak_rss": peak_mb, **memory_mb()}


def one_pass(executor: Executor, corpus: list[Path], out: Path, args) -> tuple[float, list]:
    """Seconds to embed every shard into a fresh store, and the outcomes."""
    shutil.rmtree(out, ignore_errors=True)
    config = EmbedConfig(args.model, batch_size=args.batch_size, device="cpu", decode_workers=0)
    items = [ShardItem(p.stem, str(p)) for p in corpus]
    start = time.perf_counter()
    outcomes, _ = run_stage(
        executor, functools.partial(embed_with_memory, config, str(out)), items, desc="b"
    )
    seconds = time.perf_counter() - start
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise SystemExit(f"benchmark run failed: {failed[0].name}: {failed[0].error}")
    return seconds, outcomes


def measure(name: str, executor: Executor, cores: int, corpus, root: Path, args) -> dict:
    """Steady-state pairs/s of one executor (best pass after a warm one), per core, memory."""
    one_pass(executor, corpus, root / f"{name}-warm", args)
    seconds, outcomes = best_of(
        lambda: one_pass(executor, corpus, root / name, args),
        key=lambda r: r[0],
        repeats=args.repeat,
    )
    pairs = sum(o.stats["rows"] for o in outcomes)
    return {
        "name": name,
        "cores": cores,
        "pairs_s": pairs / seconds,
        "per_core": pairs / seconds / cores,
        "processes": len({o.stats["pid"] for o in outcomes}),
        "memory": {k: max(o.stats[k] for o in outcomes) for k in ("rss", "anonymous", "peak_rss")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="open_clip:mmc-tiny")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cpus", type=int, default=2, help="Cores for the multi-worker runs.")
    parser.add_argument("--repeat", type=int, default=REPEATS)
    args = parser.parse_args()
    print(header("embed throughput per core: Ray vs local executor", args.repeat))

    import ray

    from mmcurate.engine.ray_executor import RayExecutor

    root = Path(tempfile.mkdtemp(prefix="mmc_bench_ray_"))
    try:
        corpus = generate_corpus(root / "corpus", args.shards, args.per_shard, seed=0)
        rows = [measure("local x1", LocalExecutor(1, 1), 1, corpus, root, args)]
        starts = []
        for cpus in sorted({1, args.cpus}):
            start = time.perf_counter()
            ray.init(
                address="local",
                num_cpus=cpus,
                include_dashboard=False,
                logging_level=logging.ERROR,
                log_to_driver=False,
            )
            starts.append(time.perf_counter() - start)
            executor = RayExecutor(None, 1, 0)
            rows.append(measure(f"ray x{cpus}", executor, cpus, corpus, root, args))
            ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    base = rows[0]["per_core"]
    print(
        f"\nembed {args.model}, {args.shards} shards x {args.per_shard} pairs, "
        f"batch {args.batch_size}, 1 thread per task, decode in the task process"
    )
    print(f"{'executor':<10} {'cores':>5} {'pairs/s':>9} {'pairs/s/core':>12} {'vs local x1':>11}")
    for r in rows:
        print(
            f"{r['name']:<10} {r['cores']:>5} {r['pairs_s']:>9.0f} {r['per_core']:>12.0f} "
            f"{r['per_core'] / base:>11.2f}"
        )
    print(f"Ray start-up (not in the table): {', '.join(f'{s:.1f} s' for s in starts)}")
    for r in rows[1:]:
        m = r["memory"]
        print(
            f"{r['name']}: {r['processes']} worker processes; per process RSS {m['rss']} MB "
            f"(peak {m['peak_rss']} MB), private {m['anonymous']} MB"
        )


if __name__ == "__main__":
    main()
