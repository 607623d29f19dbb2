"""`mmcurate report` at scale: wall time and peak RSS on synthetic pools of 1 M rows and more,
and the memory bound that follows for 10 M rows.

Each pool is `--files` score sidecars (uid plus clipscore, negclip, normsim_inf and semdedup,
float32, as `mmcurate score` writes them) and a subset made by the real `mmcurate select`
(negclip:0.3 then normsim_inf:0.2). The report runs in a fresh process per pool (the CLI, as a
user runs it), its peak RSS read from that process's own rusage; the same command with `--help`
gives the CLI's fixed cost (the command group imports torch for the distill commands), and the
report's own cost is also measured through the library call in a fresh process. A straight
line through the library's peak RSS at each pool size gives the fixed cost and the bytes per
row; the 10 M bound is that line at 10 M rows, and a run at 10 M (`--rows 1000000,10000000`)
checks it.

    python benchmarks/bench_report.py --rows 1000000,3000000 --out /tmp/bench_report
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import header  # noqa: E402

COLUMNS = ("clipscore", "negclip", "normsim_inf", "semdedup")


def write_pool(root: Path, rows: int, files: int, seed: int = 0) -> Path:
    """Score sidecars of `rows` random rows in `files` files (uids: random 128-bit hex)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    scores = root / "scores"
    scores.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, part in enumerate(np.array_split(np.arange(rows), files)):
        n = len(part)
        raw = rng.integers(0, 256, (n, 16), dtype=np.uint8)
        uids = pa.array([b.tobytes().hex() for b in raw], type=pa.string())
        semdedup = np.where(rng.random(n) < 0.05, 0.96 + 0.04 * rng.random(n), rng.random(n))
        table = {
            "uid": uids,
            "clipscore": rng.normal(0.3, 0.05, n).astype(np.float32),
            "negclip": rng.normal(-0.2, 0.1, n).astype(np.float32),
            "normsim_inf": rng.normal(0.5, 0.1, n).astype(np.float32),
            "semdedup": semdedup.astype(np.float32),
        }
        pq.write_table(pa.table(table), scores / f"{i:05d}.scores.parquet")
    return scores


def run_measured(args: list[str]) -> tuple[float, float, str]:
    """Run a command in a fresh process: (wall seconds, its own peak RSS in MB, stderr)."""
    began = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - began
    stderr = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {stderr[-2000:]}")
    return seconds, usage.ru_maxrss / 1024.0, stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000000,3000000", help="pool sizes, comma-separated")
    parser.add_argument("--files", type=int, default=10, help="sidecars per pool")
    parser.add_argument("--out", default="/tmp/bench_report", help="work directory")
    args = parser.parse_args()
    mmcurate = [sys.executable, "-m", "mmcurate"]
    print(header("mmcurate report on synthetic pools (wall time, peak RSS)", repeats=1))
    base_s, base_mb, _ = run_measured([*mmcurate, "report", "--help"])
    print(f"CLI fixed cost (mmcurate report --help): {base_s:.1f} s, peak RSS {base_mb:.0f} MB")
    print(f"{'rows':>11} {'files':>6} {'select s':>9} {'CLI s':>7} {'CLI MB':>7} "
          f"{'library s':>10} {'library MB':>11} {'page MB':>8}")  # fmt: skip
    measured = []
    for rows in (int(r) for r in args.rows.split(",")):
        root = Path(args.out) / f"{rows}"
        scores = write_pool(root, rows, args.files)
        subset = root / "subset.npy"
        keep = ["--keep", "negclip:0.3", "--keep", "normsim_inf:0.2"]
        sel, _, _ = run_measured([*mmcurate, "select", str(scores), "--out", str(subset), *keep])
        out = root / "report.html"
        cmd = [*mmcurate, "report", str(scores), "--subset", str(subset), "--out", str(out)]
        seconds, rss, _ = run_measured(cmd)
        size = out.stat().st_size / 1e6
        code = (
            "from mmcurate.report import ReportConfig, write_report; "
            f"write_report({str(scores)!r}, {str(root / 'lib.html')!r}, "
            f"ReportConfig(subset={str(subset)!r}))"
        )
        lib_s, lib_mb, _ = run_measured([sys.executable, "-c", code])
        measured.append((rows, lib_mb))
        print(
            f"{rows:>11,} {args.files:>6} {sel:>9.1f} {seconds:>7.1f} {rss:>7.0f} "
            f"{lib_s:>10.1f} {lib_mb:>11.0f} {size:>8.2f}"
        )
    if len(measured) >= 2:
        n = np.array([r for r, _ in measured], dtype=np.float64)
        mb = np.array([m for _, m in measured])
        slope, fixed = np.polyfit(n, mb, 1)
        print(
            f"library peak RSS ~ {fixed:.0f} MB + {slope * 2**20:.1f} bytes/row x rows; "
            f"at 10 M rows: {fixed + slope * 1e7:.0f} MB (CLI: add {base_mb:.0f} MB)"
        )


if __name__ == "__main__":
    main()
