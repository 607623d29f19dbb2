"""SemDeDup benchmark: the stage against brute-force all-pairs dedup, measured in the same run.

    python benchmarks/bench_dedup.py                      # 1M rows, d = 768, the issue's size
    python benchmarks/bench_dedup.py --rows 100000        # a smaller run
    python benchmarks/bench_dedup.py --train 1000000      # k-means on the stage's default sample

The store: float16 stems of `--stem-rows` rows written into a temp dir, CLIP-like clustered unit
vectors (centres of ~500 rows, cosine ≈ 0.4 within a centre) where `--dup-fraction` of each
stem's rows are near copies (cosine ≈ 0.99) of other rows of the same stem.

Sections (each timing the best of >= 3 runs, each run in a fresh process for its peak RSS):
- stage: `run_semdedup` over the whole store, one local worker with `--threads` threads; time
  per phase (scan, k-means, assign, members, within-cluster, values);
- baseline: brute-force all-pairs sequential dedup (every row against every earlier row, blocked
  float32 matmul) on the first `--subset` rows, extrapolated to the store by (N/subset)²;
- agreement (one run) on the first `--agree` rows: the stage against (a) a float64 brute force
  with the same clusters and order (max |difference|, identical keep decisions at ε = 0.05), and
  (b) global all-pairs dedup in the same order with no clustering (identical keep decisions).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REPEATS, best_of, header  # noqa: E402

EPSILON = 0.05


def _peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM; ru_maxrss would include the parent's at fork)."""
    return _vm_hwm_mb(os.getpid()) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _pin(threads: int) -> None:
    from mmcurate.engine import pin_threads

    pin_threads(threads)


# --------------------------------------------------------------------------- the store


def make_store(root: Path, rows: int, d: int, stem_rows: int, dup_fraction: float, seed: int):
    """Clustered float16 unit rows with planted near copies, one stem per `stem_rows` rows."""
    import pyarrow as pa

    from mmcurate.data.store import write_stem
    from mmcurate.data.uid import sample_uid

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, rows // 500), d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for i, start in enumerate(range(0, rows, stem_rows)):
        n = min(stem_rows, rows - start)
        r = np.random.default_rng([seed, i])
        x = centres[r.integers(0, len(centres), n)]
        x = x + 1.2 * r.standard_normal((n, d), dtype=np.float32) / np.sqrt(d)
        copies = r.choice(n, int(dup_fraction * n), replace=False)
        sources = r.integers(0, n, len(copies))
        x[copies] = x[sources] + 0.15 * r.standard_normal((len(copies), d), dtype=np.float32) * (
            np.linalg.norm(x[sources], axis=1, keepdims=True) / np.sqrt(d)
        )
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        stem = f"{i:05d}"
        keys = [f"{j:06d}" for j in range(n)]
        meta = pa.table(
            {
                "uid": [sample_uid(stem, k) for k in keys],
                "key": keys,
                "caption": [""] * n,
                "url": [None] * n,
                "shard": [stem] * n,
            }
        )
        write_stem(root, stem, meta, {"img": x.astype(np.float16)}, {})


def read_rows(store: Path, limit: int) -> np.ndarray:
    """The first `limit` rows of the store as float32 unit rows."""
    from mmcurate.curate.semdedup import unit_rows
    from mmcurate.data.store import finished_stems, read_arrays

    parts, have = [], 0
    for stem in finished_stems(store):
        if have >= limit:
            break
        img = read_arrays(store, stem, ["img"])["img"]
        parts.append(unit_rows(img[: limit - have]))
        have += len(parts[-1])
    return np.concatenate(parts)


def sub_store(store: Path, root: Path, rows: int, stem_rows: int) -> Path:
    """A store of the first stems holding `rows` rows, as symlinks."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(math.ceil(rows / stem_rows)):
        for suffix in (".parquet", ".npz", ".done.json"):
            link = root / f"{i:05d}{suffix}"
            if not link.exists():
                link.symlink_to(store / f"{i:05d}{suffix}")
    return root


# --------------------------------------------------------------------------- brute force


def sequential_dedup(x: np.ndarray, block: int = 4096) -> np.ndarray:
    """Brute-force all-pairs: each row's largest cosine to any earlier row (float32, blocked)."""
    import torch

    xt = torch.from_numpy(x)
    out = np.full(len(x), -1.0, dtype=np.float32)
    for j0 in range(0, len(x), block):
        j1 = min(j0 + block, len(x))
        best = torch.full((j1 - j0,), -torch.inf)
        for i0 in range(0, j1, block):
            s = xt[j0:j1] @ xt[i0 : min(i0 + block, j1)].T
            if i0 == j0:
                s.masked_fill_(torch.ones_like(s, dtype=torch.bool).triu_(0), -torch.inf)
            best = torch.maximum(best, s.amax(dim=1))
        out[j0:j1] = np.where(torch.isfinite(best).numpy(), best.numpy(), -1.0)
    return out


def same_clusters_brute(x64: np.ndarray, cluster: np.ndarray, order_key: tuple) -> np.ndarray:
    """float64 SemDeDup by definition with the given clusters and order keys (cos, uid)."""
    cos, uid = order_key
    values = np.empty(len(x64))
    order = np.lexsort((uid, cos, cluster))
    bounds = np.flatnonzero(np.r_[True, cluster[order][1:] != cluster[order][:-1], True])
    for a, b in zip(bounds[:-1], bounds[1:]):
        members = order[a:b]
        s = x64[members] @ x64[members].T
        s[np.tril_indices(b - a)] = -np.inf  # only earlier members (row < column) count
        values[members] = np.r_[-1.0, s.max(axis=0)[1:]]
    return values


# --------------------------------------------------------------------------- child processes


class WorkerPeak(threading.Thread):
    """Polls the peak RSS (VmHWM) of this process's children, the executor's workers.

    ru_maxrss of a child is no use here: a forked child inherits the parent's high-water mark.
    VmHWM belongs to the child's own address space after exec, so it is the worker's own peak.
    """

    def __init__(self, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.every, self.peak, self.done = every, 0.0, threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.wait(self.every):
            for pid in _children(os.getpid()):
                self.peak = max(self.peak, _vm_hwm_mb(pid))

    def stop(self) -> float:
        """Stop polling; the largest peak seen, MB."""
        self.done.set()
        self.join()
        return self.peak


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except OSError:
        return []


def _vm_hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return 0.0


def child_stage(
    store: str, work: str, workers: int, threads: int, train: int, clusters: int | None
) -> dict:
    """The stage as `score --metric semdedup` would run it, on the local executor."""
    from mmcurate.curate.dedup_plan import DedupConfig
    from mmcurate.curate.dedup_stage import run_semdedup
    from mmcurate.engine import LocalExecutor

    config = DedupConfig(train=train, clusters=clusters)
    watch = WorkerPeak()
    start = time.perf_counter()
    try:
        summary = run_semdedup(store, work, ["img"], config, LocalExecutor(workers, threads))
    finally:
        children = watch.stop()
    keys = ("rows", "clusters", "clusters_nonempty", "largest_cluster", "train_rows", "failed")
    return {
        "wall": time.perf_counter() - start,
        "seconds": summary["seconds"],
        "rss_mb": _peak_rss_mb(),
        "worker_rss_mb": children,
    } | {k: summary[k] for k in keys}


def child_brute(store: str, rows: int, threads: int) -> dict:
    """Brute-force all-pairs sequential dedup of the first `rows` rows."""
    _pin(threads)
    x = read_rows(Path(store), rows)
    start = time.perf_counter()
    sequential_dedup(x)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rss_mb": _peak_rss_mb(), "rows": len(x), "threads": threads}


def child_imports() -> dict:
    """Peak RSS of a process that only imports the stage (torch, faiss, pyarrow)."""
    import mmcurate.curate.dedup_stage  # noqa: F401

    return {"rss_mb": _peak_rss_mb()}


def child_agree(store: str, work: str, workers: int, threads: int) -> dict:
    """The stage on a small store against the two brute forces."""
    from mmcurate.curate.dedup_plan import DedupConfig
    from mmcurate.curate.dedup_stage import run_semdedup, semdedup_values
    from mmcurate.data.store import finished_stems
    from mmcurate.engine import LocalExecutor

    summary = run_semdedup(store, work, ["img"], DedupConfig(), LocalExecutor(workers, threads))
    stems = finished_stems(store)
    values = np.concatenate([semdedup_values(work, s, summary["key"]) for s in stems])
    parts = [np.load(Path(work, "assign", f"{s}.npz")) for s in stems]
    cluster = np.concatenate([p["cluster"] for p in parts])
    cos = np.concatenate([p["cos"] for p in parts])
    uid = np.concatenate([p["uid"] for p in parts])
    x = read_rows(Path(store), summary["rows"])
    same = same_clusters_brute(x.astype(np.float64), cluster, (cos, uid))
    order = np.lexsort((uid, cos))
    global_values = np.empty(len(x), dtype=np.float32)
    global_values[order] = sequential_dedup(x[order])
    keep, keep_same, keep_global = (v <= 1 - EPSILON for v in (values, same, global_values))
    return {
        "rows": len(x),
        "clusters": summary["clusters"],
        "max_abs_diff_same": float(np.abs(values - same).max()),
        "decisions_same": float((keep == keep_same).mean()),
        "decisions_global": float((keep == keep_global).mean()),
        "removed": int((~keep).sum()),
        "removed_same": int((~keep_same).sum()),
        "removed_same_both": int((~keep & ~keep_same).sum()),
        "removed_global": int((~keep_global).sum()),
        "removed_by_both": int((~keep & ~keep_global).sum()),
    }


def _run_child(args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--child", json.dumps(args), "--threads", str(threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {args} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report


def table(title: str, head: list[str], rows: list[list]) -> None:
    print(f"\n{title}\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--stem-rows", type=int, default=10_000)
    ap.add_argument("--dup-fraction", type=float, default=0.05)
    ap.add_argument("--workers", type=int, default=2, help="local executor processes")
    ap.add_argument("--threads", type=int, default=1, help="compute threads per process")
    ap.add_argument("--clusters", type=int, default=None, help="default: round(sqrt(rows))")
    ap.add_argument(
        "--train",
        type=int,
        default=None,
        help="k-means sample; default 256 per cluster, FAISS's own cap (the stage's is 1M)",
    )
    ap.add_argument("--subset", type=int, default=20_000, help="rows of the brute-force baseline")
    ap.add_argument("--agree", type=int, default=50_000, help="rows of the agreement section")
    ap.add_argument("--repeats", type=int, default=REPEATS)
    ap.add_argument("--work-dir", default=None, help="where the store is written (default: tmp)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        name, *rest = json.loads(args.child)
        fn = {
            "stage": child_stage,
            "brute": child_brute,
            "agree": child_agree,
            "imports": child_imports,
        }[name]
        print(json.dumps(fn(*rest)))
        return
    k = args.clusters or max(1, round(math.sqrt(args.rows)))
    train = args.train or min(args.rows, 256 * k)
    cpus = args.workers * args.threads
    print(header(f"SemDeDup: {args.rows:,} rows, d = {args.dim}, K = {k}, k-means on {train:,}"))
    root = Path(tempfile.mkdtemp(prefix="bench-dedup-", dir=args.work_dir))
    store = root / "store"
    try:
        start = time.perf_counter()
        make_store(store, args.rows, args.dim, args.stem_rows, args.dup_fraction, 0)
        print(f"store written in {time.perf_counter() - start:.1f} s", flush=True)
        runs = iter(range(10**6))

        def stage() -> dict:
            work = root / f"work{next(runs)}"
            cmd = ["stage", str(store), str(work), args.workers, args.threads, train, k]
            out = _run_child(cmd, args.threads)
            shutil.rmtree(work)
            print(f"stage run: {out['wall']:.1f} s {out['seconds']}", flush=True)
            return out

        best = best_of(stage, key=lambda r: r["wall"], repeats=args.repeats)
        subset = min(args.subset, args.rows)
        brute = best_of(
            lambda: _run_child(["brute", str(store), subset, cpus], cpus),
            key=lambda r: r["seconds"],
            repeats=args.repeats,
        )
        imports = _run_child(["imports"], 1)
        small = sub_store(store, root / "small", min(args.agree, args.rows), args.stem_rows)
        cmd = ["agree", str(small), str(root / "agree"), args.workers, args.threads]
        agree = _run_child(cmd, args.threads)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(args, best, brute, agree, imports)


def report(args, best: dict, brute: dict, agree: dict, imports: dict) -> None:
    """The two tables, in markdown."""
    s = best["seconds"]
    extrapolated = brute["seconds"] * (args.rows / brute["rows"]) ** 2
    within = s.get("members", 0) + s.get("clusters", 0) + s.get("values", 0)
    kmeans = f"  k-means ({best['train_rows']:,} rows, K = {best['clusters']})"
    rows = [
        ["SemDeDup stage, total", best["wall"], extrapolated / best["wall"], best["rss_mb"]],
        ["  (its worker processes, each)", None, None, best["worker_rss_mb"]],
        ["  (a process that only imports the stage)", None, None, imports["rss_mb"]],
        ["  scan (valid rows)", s["scan"], None, None],
        [kmeans, s["kmeans"], None, None],
        ["  assign to centroids", s["assign"], None, None],
        [
            f"  within clusters (largest {best['largest_cluster']:,})",
            within,
            extrapolated / within,
            None,
        ],
        [
            f"brute force all pairs, {brute['rows']:,} rows, {brute['threads']} thread(s)",
            brute["seconds"],
            None,
            brute["rss_mb"],
        ],
        [f"brute force all pairs, {args.rows:,} rows, × (N/n)²", extrapolated, 1.0, None],
    ]
    table(
        f"{args.rows:,} rows, d = {args.dim}: best of {args.repeats}, "
        f"{args.workers} worker(s) x {args.threads} thread(s)",
        ["what", "seconds", "× brute force", "peak RSS MB"],
        [
            [w, f"{t:,.1f}" if t else "", f"{r:,.0f}" if r else "", f"{m:,.0f}" if m else ""]
            for w, t, r, m in rows
        ],
    )
    same = f"{agree['removed']} / {agree['removed_same']} / {agree['removed_same_both']}"
    glob = f"{agree['removed']} / {agree['removed_global']} / {agree['removed_by_both']}"
    table(
        f"agreement, {agree['rows']:,} rows (K = {agree['clusters']}), kept when <= {1 - EPSILON}",
        ["brute force", "identical decisions", "max abs diff", "removed: stage / brute / both"],
        [
            [
                "float64, same clusters and order",
                f"{agree['decisions_same']:.6f}",
                f"{agree['max_abs_diff_same']:.1e}",
                same,
            ],
            ["all pairs, same order, no clusters", f"{agree['decisions_global']:.6f}", "", glob],
        ],
    )


if __name__ == "__main__":
    main()
