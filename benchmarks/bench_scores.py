"""Score benchmarks: each method against a baseline measured in the same run, as ratio tables.

    python benchmarks/bench_scores.py                      # every section, full sizes
    python benchmarks/bench_scores.py --quick              # small sizes, a minute or two
    python benchmarks/bench_scores.py --only negclip,normsim2 --threads 2

Every timing is the best of --repeat (>= 3) runs, and the 1-minute load average at the start is
printed first: the machine is shared, and one timing says more about the neighbours.

Sections:
- negclip: blocked logsumexp (mmcurate) vs the naive full B×B exp-then-log of the published
  code, one batch of B pairs; pairs/s, GFLOP/s (2·B²·d per batch) as a fraction of this
  machine's float32 matmul peak (measured in the same process just before each timed run, as
  the machine is shared), peak RSS measured in a subprocess per method, and non-finite outputs
  at τ = 0.01 (1% of pairs are near-duplicates, s ≈ 0.95);
- normsim2: Gram (precompute TᵀT once, then xᵀGx) vs brute force Σ_t (tᵀx)²;
- normsim_inf: faiss flat vs blocked torch matmul, and faiss IVF vs flat (speed-up, recall@1,
  agreement of the top-20% selection) on clustered synthetic embeddings;
- e2e: `run_score` over a float16 store of N pairs (the stage as the CLI runs it) in a
  subprocess: pairs/s and peak RSS; then peak RSS for a pool twice as large with the same
  window, and for twice the window, to show memory follows the window and not the pool;
- normsim_d: `select --keep normsim_d:F` over a float16 store of N rows, through the real stage:
  how many times it read the pool and how many bytes (counted by the stage's readers), against
  the (num_iters + 2.1) passes of reading every survivor on every iteration.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import REPEATS, header


def _pin(threads: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)
    import faiss

    faiss.omp_set_num_threads(threads)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def clip_like_pairs(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs with s_ii ≈ 0.3 like CLIP, and 1% near-duplicates with s_ii ≈ 0.95."""
    rng = np.random.default_rng(seed)
    img = _unit(rng, n, d)
    noise = _unit(rng, n, d)
    mix = np.full((n, 1), 0.3, dtype=np.float32)
    mix[rng.random(n) < 0.01] = 0.95
    txt = mix * img + np.sqrt(1 - mix**2) * noise
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img, txt


def clustered(n: int, d: int, centres: np.ndarray, spread: float, seed: int) -> np.ndarray:
    """Unit vectors around random centres (a stand-in for class structure in CLIP space)."""
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal(
        (n, d), dtype=np.float32
    ) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def matmul_peak(d: int, seconds: float = 2.0) -> float:
    """Best float32 GFLOP/s of a large matmul at the current thread count."""
    import torch

    a, b = torch.randn(2048, d), torch.randn(d, 8192)
    a @ b
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * 2048 * d * 8192 / (time.perf_counter() - t) / 1e9)
    return best


def matmul_peak_cpu(d: int, reps: int = 10) -> float:
    """float32 matmul GFLOP per CPU-second of this process (robust to a shared machine)."""
    import torch

    a, b = torch.randn(2048, d), torch.randn(d, 8192)
    a @ b
    cpu = _cpu_seconds()
    for _ in range(reps):
        a @ b
    return reps * 2 * 2048 * d * 8192 / (_cpu_seconds() - cpu) / 1e9


def _timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# --------------------------------------------------------------------------- subprocess workers


def worker_negclip(method: str, b: int, d: int, block: int, repeat: int) -> dict:
    """One negclip batch in a fresh process, so its peak RSS is its own."""
    import torch

    from mmcurate.curate.scores import batch_logsumexp

    img, txt = clip_like_pairs(b, d, seed=0)
    f, g = torch.from_numpy(img), torch.from_numpy(txt)
    tau = 0.01
    peaks = [matmul_peak(d, 1.0)]
    base_rss = _peak_rss_mb()

    def blocked():
        rows, cols = batch_logsumexp(f, g, tau, block)
        return (f * g).sum(1) - tau / 2 * (rows + cols)

    def naive():
        logits = f @ g.t() / tau
        e = torch.exp(logits)
        return (f * g).sum(1) - tau / 2 * (torch.log(e.sum(1)) + torch.log(e.sum(0)))

    fn = {"blocked": blocked, "naive": naive}[method]
    out = fn()
    seconds, fractions = [], []
    for _ in range(repeat):
        peaks.append(matmul_peak(d, 1.0))
        seconds.append(_timed(fn, 1))
        fractions.append(2 * b * b * d / seconds[-1] / 1e9 / peaks[-1])
    return {
        "seconds": min(seconds),
        "of_peak": max(fractions),
        "peak_gflops": max(peaks),
        "nonfinite": int((~torch.isfinite(out)).sum()),
        "rss_mb": _peak_rss_mb(),
        "inputs_rss_mb": base_rss,
    }


def worker_e2e(store: str, out: str, b: int, k: int, window: int, threads: int) -> dict:
    """The score stage over a store, as `mmcurate score` runs it with one local worker."""
    from mmcurate.curate.score_config import ScoreConfig
    from mmcurate.curate.score_stage import run_score
    from mmcurate.engine import LocalExecutor

    cfg = ScoreConfig(batch_size=b, k=k, window=window, temperature=0.01)
    start, cpu = time.perf_counter(), _cpu_seconds()
    summary = run_score(store, out, cfg, LocalExecutor(workers=1, threads=threads))
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "cpu_seconds": _cpu_seconds() - cpu,
        "rows": summary["rows"],
        "failed": summary["failed"],
        "windows": summary["windows"],
        "rss_mb": _peak_rss_mb(),
    }


def worker_baseline() -> dict:
    """Peak RSS of a process that only imports what the score stage imports (torch, faiss)."""
    import mmcurate.curate.score_stage  # noqa: F401

    return {"rss_mb": _peak_rss_mb()}


def _run_worker(args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", *args, "--threads", str(threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {args} exited with {done.returncode}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- sections


def table(title: str, header: list[str], rows: list[list]) -> None:
    """Print a fixed-width table."""
    print(f"\n## {title}")
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def bench_negclip(args) -> None:
    b, d = args.negclip_b, args.d
    flops = 2 * b * b * d
    common = [str(b), str(d), str(args.negclip_block), str(args.repeat)]
    res = {m: _run_worker(["negclip", m, *common], args.threads) for m in ("naive", "blocked")}
    rows = []
    for m in ("naive", "blocked"):
        r = res[m]
        gflops = flops / r["seconds"] / 1e9
        rows.append(
            [
                m,
                f"{b / r['seconds']:,.0f}",
                f"{gflops:.1f}",
                f"{r['of_peak']:.2f} of {r['peak_gflops']:.0f}",
                f"{r['rss_mb']:,.0f}",
                f"{r['rss_mb'] - r['inputs_rss_mb']:,.0f}",
                r["nonfinite"],
                f"{res['naive']['seconds'] / r['seconds']:.2f}x",
            ]
        )
    table(
        f"negclip, one batch B={b}, d={d}, τ=0.01, block={args.negclip_block}, "
        f"{args.threads} thread(s); best of {args.repeat}",
        [
            "method",
            "pairs/s",
            "GFLOP/s",
            "of matmul peak (GFLOP/s)",
            "peak RSS MB",
            "RSS growth MB",
            "non-finite",
            "speed vs naive",
        ],
        rows,
    )


def bench_normsim2(args) -> None:
    import torch

    from mmcurate.curate.normsim import gram, normsim_2

    d = args.d
    centres = _unit(np.random.default_rng(0), 1000, d)
    t = clustered(args.gram_targets, d, centres, 1.0, seed=1)
    x = clustered(args.gram_candidates, d, centres, 1.5, seed=2)

    def brute():
        tt = torch.from_numpy(t)
        out = np.empty(len(x), dtype=np.float32)
        for r0 in range(0, len(x), 4096):
            xb = torch.from_numpy(x[r0 : r0 + 4096])
            acc = torch.zeros(len(xb), dtype=torch.float64)
            for t0 in range(0, len(t), 16384):
                acc += ((xb @ tt[t0 : t0 + 16384].t()) ** 2).sum(1).double()
            out[r0 : r0 + 4096] = acc.sqrt().numpy()
        return out

    t_brute = _timed(brute, args.repeat)
    ref = brute()
    g_holder = {}
    t_pre = _timed(lambda: g_holder.update(g=gram(t)), args.repeat)
    g = g_holder["g"]
    t_apply = _timed(lambda: normsim_2(x, g), args.repeat)
    err = float(np.abs(normsim_2(x, g) - ref).max())
    table(
        f"normsim_2, {len(t):,} targets x {len(x):,} candidates, d={d}, {args.threads} thread(s)",
        ["method", "seconds", "candidates/s", "speed-up vs brute", "max |err|"],
        [
            ["brute force Σ(tᵀx)²", f"{t_brute:.2f}", f"{len(x) / t_brute:,.0f}", "1.0x", "-"],
            [
                "Gram xᵀ(TᵀT)x (apply)",
                f"{t_apply:.3f}",
                f"{len(x) / t_apply:,.0f}",
                f"{t_brute / t_apply:.0f}x",
                f"{err:.1e}",
            ],
            [
                "Gram incl. one-time TᵀT",
                f"{t_pre + t_apply:.2f}",
                f"{len(x) / (t_pre + t_apply):,.0f}",
                f"{t_brute / (t_pre + t_apply):.1f}x",
                f"{err:.1e}",
            ],
        ],
    )


def bench_normsim_inf(args) -> None:
    from mmcurate.curate.normsim import MaxAbsIndex, normsim_inf_exact

    d = args.d
    rng = np.random.default_rng(3)
    centres = _unit(rng, args.inf_clusters, d)
    t = clustered(args.inf_targets, d, centres, 1.0, seed=4)
    other = _unit(rng, args.inf_clusters, d)
    x = np.concatenate(
        [
            clustered(args.inf_candidates // 2, d, centres, 1.5, seed=5),
            clustered(args.inf_candidates - args.inf_candidates // 2, d, other, 1.5, seed=6),
        ]
    )
    t_torch = _timed(lambda: normsim_inf_exact(x, t), args.repeat)
    exact = normsim_inf_exact(x, t)
    flat = MaxAbsIndex(t, "flat")
    t_flat = _timed(lambda: flat.search(x), args.repeat)
    assert np.allclose(flat.search(x), exact, atol=1e-5)
    n_top = len(x) // 5
    top_exact = set(np.argsort(-exact, kind="stable")[:n_top].tolist())
    rows = [
        ["torch blocked matmul", f"{t_torch:.2f}", f"{len(x) / t_torch:,.0f}", "-", "1", "1"],
        [
            "faiss flat (x and -x)",
            f"{t_flat:.2f}",
            f"{len(x) / t_flat:,.0f}",
            f"{t_torch / t_flat:.2f}x vs torch",
            "1",
            "1",
        ],
    ]
    for nprobe in args.nprobe:
        t_build = time.perf_counter()
        ivf = MaxAbsIndex(t, "ivf", nprobe=nprobe)
        t_build = time.perf_counter() - t_build
        t_ivf = _timed(lambda ivf=ivf: ivf.search(x), args.repeat)
        approx = ivf.search(x)
        recall = float(np.mean(approx >= exact - 1e-6))
        top = set(np.argsort(-approx, kind="stable")[:n_top].tolist())
        rows.append(
            [
                f"faiss IVF nlist={ivf.nlist} nprobe={ivf.nprobe} (build {t_build:.1f}s)",
                f"{t_ivf:.2f}",
                f"{len(x) / t_ivf:,.0f}",
                f"{t_flat / t_ivf:.1f}x vs flat",
                f"{recall:.3f}",
                f"{len(top & top_exact) / n_top:.4f}",
            ]
        )
    table(
        f"normsim_inf, {len(t):,} targets ({args.inf_clusters} clusters) x {len(x):,} "
        f"candidates, d={d}, {args.threads} thread(s)",
        ["method", "seconds", "candidates/s", "speed-up", "recall@1", "top-20% agreement"],
        rows,
    )


def make_store(root: Path, n: int, d: int, stem_rows: int) -> None:
    """A float16 store of CLIP-like pairs, `stem_rows` per stem."""
    import pyarrow as pa

    from mmcurate.data.store import write_stem

    root.mkdir(parents=True, exist_ok=True)
    for i, r0 in enumerate(range(0, n, stem_rows)):
        rows = min(stem_rows, n - r0)
        stem = f"{i:05d}"
        img, txt = clip_like_pairs(rows, d, seed=i)
        uids = [f"{i:016x}{j:016x}" for j in range(rows)]
        meta = pa.table({"uid": uids, "key": [str(j) for j in range(rows)]})
        write_stem(
            root, stem, meta, {"img": img.astype(np.float16), "txt": txt.astype(np.float16)}, {}
        )


def bench_e2e(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="mmc_bench_", dir=args.work_dir))
    try:
        store = work / "store"
        t = time.perf_counter()
        make_store(store, args.e2e_pairs, args.d, args.stem_rows)
        made = time.perf_counter() - t
        common = [str(args.e2e_b), str(args.e2e_k)]
        runs = []
        for i in range(args.repeat):
            out = str(work / f"out{i}")
            runs.append(
                _run_worker(["e2e", str(store), out, *common, str(args.e2e_window)], args.threads)
            )
            if runs[-1]["failed"]:
                raise RuntimeError(f"e2e failed: {runs[-1]['failed']}")
        r = min(runs, key=lambda run: run["seconds"])
        base = _run_worker(["baseline"], args.threads)["rss_mb"]
        peak = matmul_peak_cpu(args.d)
        rows = [
            [
                f"{args.e2e_pairs:,}",
                args.e2e_window,
                args.e2e_b,
                args.e2e_k,
                r["windows"],
                f"{r['seconds']:.0f}",
                f"{r['cpu_seconds']:.0f}",
                f"{r['rows'] / r['seconds']:,.0f}",
                f"{r['rows'] / r['cpu_seconds']:,.0f}",
                f"{2 * r['rows'] * args.e2e_b * args.d * args.e2e_k / r['cpu_seconds'] / 1e9:.1f}",
                f"{r['rss_mb']:,.0f}",
                f"{base:,.0f}",
            ]
        ]
        table(
            f"end to end: run_score, d={args.d}, τ=0.01, metrics clipscore+negclip, "
            f"{args.threads} thread(s) (store written in {made:.0f}s); float32 matmul peak "
            f"{peak:.1f} GFLOP/CPU-s",
            [
                "pairs",
                "window",
                "B",
                "K",
                "windows",
                "wall s",
                "CPU s",
                "pairs/s (wall)",
                "pairs/CPU-s",
                "negclip GFLOP/CPU-s",
                "peak RSS MB",
                "import-only RSS MB",
            ],
            rows,
        )
        if args.rss_window:
            bench_rss_scaling(args, store, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_rss_scaling(args, store: Path, work: Path) -> None:
    """Peak RSS for (pool, window) = (P, W), (2P, W), (2P, 2W) with small B and K=1."""
    w = args.rss_window
    stems = sorted(p.name[: -len(".parquet")] for p in store.glob("*.parquet"))
    per = args.stem_rows
    need = 4 * w // per
    if len(stems) < need:
        print(f"\n(rss scaling skipped: needs a store of >= {4 * w:,} pairs)")
        return
    rows = []
    for pool, window in ((2 * w, w), (4 * w, w), (4 * w, 2 * w)):
        sub = work / f"pool{pool}_w{window}"
        sub.mkdir()
        for s in stems[: pool // per]:
            for ext in (".parquet", ".npz", ".done.json"):
                os.symlink(store / f"{s}{ext}", sub / f"{s}{ext}")
        r = _run_worker(
            ["e2e", str(sub), str(sub) + "_out", "4096", "1", str(window)],
            args.threads,
        )
        rows.append([f"{pool:,}", f"{window:,}", r["windows"], f"{r['rss_mb']:,.0f}"])
    table(
        f"peak RSS vs pool and window (B=4096, K=1, d={args.d})",
        ["pool", "window", "windows", "peak RSS MB"],
        rows,
    )


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:,.1f} MiB"


def bench_normsim_d(args) -> None:
    """NormSim-D over a float16 store: through `select` (default memory budget, the pool fits)
    and through the stage's readers with a budget of half the pool; bytes as the readers
    counted them (one run each: reads do not depend on timing)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from bench_precision import clip_like

    from mmcurate.curate.normsim_d import SurvivorChunks
    from mmcurate.curate.normsim_d_math import normsim_d_run
    from mmcurate.curate.select import SelectConfig, select
    from mmcurate.data.store import write_stem
    from mmcurate.data.uid import hex_to_pairs

    work = Path(tempfile.mkdtemp(prefix="mmc_nsd_", dir=args.work_dir))
    n, per, iters = args.d_rows, args.stem_rows, args.d_iters
    pool_bytes = n * args.d * 2
    rows = []
    try:
        store, scores = work / "store", work / "scores"
        store.mkdir()
        scores.mkdir()
        groups = []
        for i, r0 in enumerate(range(0, n, per)):
            count = min(per, n - r0)
            img, _ = clip_like(count, args.d, seed=i)
            uids = [f"{i:016x}{j:016x}" for j in range(count)]
            write_stem(store, f"{i:05d}", pa.table({"uid": uids}), {"img": img}, {})
            sidecar = pa.table({"uid": uids, "clipscore": np.zeros(count, np.float32)})
            pq.write_table(sidecar, scores / f"{i:05d}.scores.parquet")
            groups.append((f"{i:05d}", np.sort(hex_to_pairs(sidecar.column("uid")))))
        rule = f"normsim_d:{args.d_fraction:g}"
        config = SelectConfig(keep=(rule,), store=str(store), normsim_d_iters=iters)
        start = time.perf_counter()
        _, report = select(scores, config, progress=False)
        reads = report["stages"][0]["reads"]
        rows.append(
            [
                f"select (budget {_size(reads['memory_bytes'])})",
                reads["passes"],
                f"{reads['pool_reads']:.2f}",
                _size(reads["bytes"]),
                f"{time.perf_counter() - start:.0f}",
            ]
        )
        chunks = SurvivorChunks(store, "img", groups)
        start = time.perf_counter()
        target = int(args.d_fraction * n)
        _, half = normsim_d_run(chunks, target, num_iters=iters, memory_bytes=pool_bytes // 2)
        rows.append(
            [
                f"stage readers, budget {_size(pool_bytes // 2)} (half the pool)",
                half.passes,
                f"{half.rows / n:.2f}",
                _size(chunks.bytes_read),
                f"{time.perf_counter() - start:.0f}",
            ]
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table(
        f"normsim_d, {n:,} rows x d={args.d} float16 ({_size(pool_bytes)}), keep "
        f"{args.d_fraction:g}, {iters} iterations, {args.threads} thread(s); reading every "
        f"survivor on every iteration is >= {iters + 2.1:.1f} pool reads "
        f"({_size((iters + 2.1) * pool_bytes)})",
        ["run", "passes", "pool reads", "bytes read", "seconds"],
        rows,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", default="negclip,normsim2,normsim_inf,e2e")
    ap.add_argument("--quick", action="store_true", help="small sizes for a fast check")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=REPEATS, help=f"best of N (>= {REPEATS})")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--negclip-b", type=int, default=16384)
    ap.add_argument("--negclip-block", type=int, default=256)
    ap.add_argument("--gram-targets", type=int, default=100_000)
    ap.add_argument("--gram-candidates", type=int, default=20_000)
    ap.add_argument("--inf-targets", type=int, default=100_000)
    ap.add_argument("--inf-candidates", type=int, default=20_000)
    ap.add_argument("--inf-clusters", type=int, default=1000)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[0])
    ap.add_argument("--e2e-pairs", type=int, default=1_000_000)
    ap.add_argument("--e2e-b", type=int, default=32768)
    ap.add_argument("--e2e-k", type=int, default=10)
    ap.add_argument("--e2e-window", type=int, default=1_048_576)
    ap.add_argument("--stem-rows", type=int, default=10_000)
    ap.add_argument("--rss-window", type=int, default=0, help="also run the RSS scaling table")
    ap.add_argument("--work-dir", default=None, help="where the e2e store is written")
    ap.add_argument("--d-rows", type=int, default=1_000_000, help="normsim_d pool rows")
    ap.add_argument("--d-iters", type=int, default=500)
    ap.add_argument("--d-fraction", type=float, default=0.3)
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    _pin(args.threads)
    if args.worker:
        faulthandler.enable()
        faulthandler.register(signal.SIGTERM, chain=True)
        kind, *rest = args.worker
        if kind == "baseline":
            out = worker_baseline()
        elif kind == "negclip":
            m, b, d, block, repeat = rest
            out = worker_negclip(m, int(b), int(d), int(block), int(repeat))
        else:
            store, out_dir, b, k, window = rest
            out = worker_e2e(store, out_dir, int(b), int(k), int(window), args.threads)
        print(json.dumps(out))
        return
    if args.repeat < REPEATS:
        raise SystemExit(f"--repeat must be >= {REPEATS}")
    print(header(f"score benchmarks, {args.threads} thread(s)", args.repeat))
    if args.quick:
        args.negclip_b, args.d = 4096, 256
        args.gram_targets, args.gram_candidates = 20_000, 5_000
        args.inf_targets, args.inf_candidates, args.inf_clusters = 20_000, 5_000, 200
        args.e2e_pairs, args.e2e_b, args.e2e_k, args.e2e_window = 40_000, 4096, 2, 20_000
        args.stem_rows, args.rss_window = 5_000, args.rss_window and 10_000
        args.d_rows, args.d_iters = 50_000, 50
    sections = {
        "negclip": bench_negclip,
        "normsim2": bench_normsim2,
        "normsim_inf": bench_normsim_inf,
        "e2e": bench_e2e,
        "normsim_d": bench_normsim_d,
    }
    for name in args.only.split(","):
        sections[name](args)


if __name__ == "__main__":
    main()
