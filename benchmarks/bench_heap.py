"""Training on the CPU with glibc's default heap against `keep_freed_heap()`.

    python benchmarks/bench_heap.py                 # the demo's full-subset student
    python benchmarks/bench_heap.py --epochs 5      # a quick look

One evaluation student (`train_student`, convnet-tiny, 32 px, batch 128) trains on N random
pairs in a fresh single-thread subprocess per run: once as mmcurate does (the heap keeps freed
memory), once with glibc's defaults (the call skipped), so the next step's activations are
faulted back in from the kernel. Each row is the best of >= 3 runs by wall time; minor page
faults and peak RSS come from the same run. Ratios are against the default heap.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REPEATS, best_of, header  # noqa: E402

MODES = ("default", "keep")


def worker(args: argparse.Namespace) -> None:
    """Train one student with the heap as `args.worker` says; print a JSON line of its cost."""
    import torch

    import mmcurate.distill.evaluate as evaluate
    from mmcurate.distill.evaluate import EvalConfig, SmallSet, train_student
    from mmcurate.distill.students import build_student

    torch.set_num_threads(1)
    if args.worker == "default":
        evaluate.keep_freed_heap = lambda: False
    gen = torch.Generator().manual_seed(0)
    small = SmallSet(
        images=torch.randn(args.pairs, 3, args.size, args.size, generator=gen),
        texts=torch.randn(args.pairs, args.text_dim, generator=gen),
        similarity=torch.eye(args.pairs),
        lr_img=0.01,
        lr_txt=0.01,
        loss="ce",
        arch={},
    )
    student = build_student("convnet-tiny", args.text_dim, args.size, seed=0)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    train_student(student, small, EvalConfig(epochs=args.epochs), seed=0, device="cpu")
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "wall": wall,
                "user": after.ru_utime - before.ru_utime,
                "sys": after.ru_stime - before.ru_stime,
                "faults": after.ru_minflt - before.ru_minflt,
                "rss_mb": after.ru_maxrss / 1024,
            }
        )
    )


def run(mode: str, args: argparse.Namespace) -> dict:
    """One fresh subprocess training one student with the heap in `mode`."""
    cmd = [sys.executable, __file__, "--worker", mode, "--epochs", str(args.epochs)]
    cmd += ["--pairs", str(args.pairs), "--size", str(args.size), "--text-dim", str(args.text_dim)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--text-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(header(f"heap: one student, {args.pairs} pairs, {args.epochs} epochs", args.repeats))
    rows = {
        m: best_of(lambda m=m: run(m, args), key=lambda r: r["wall"], repeats=args.repeats)
        for m in MODES
    }
    base = rows["default"]
    print(
        f"{'heap':<10}{'wall s':>9}{'user s':>9}{'sys s':>8}{'faults':>11}{'RSS MB':>9}"
        f"{'wall ×':>9}"
    )
    for mode, r in rows.items():
        print(
            f"{mode:<10}{r['wall']:>9.2f}{r['user']:>9.2f}{r['sys']:>8.2f}{r['faults']:>11,}"
            f"{r['rss_mb']:>9.0f}{base['wall'] / r['wall']:>9.2f}"
        )


if __name__ == "__main__":
    main()
