"""Trajectory-matching benchmark: seconds per iteration and peak memory against syn_steps.

    python benchmarks/bench_distill.py                          # the issue's setting (slow)
    python benchmarks/bench_distill.py --size 32 --steps 4 8    # a quick look

Three variants of one matching iteration (SPEC §6), each measured in a fresh subprocess:
- tesla: constant-memory first order (`--matching tesla`, the default of `mmcurate distill`);
- graph: the same first-order objective as one autograd graph over all steps (the reference
  the constant-memory gradient must equal);
- full: the second-order unroll of the original MTT (`--matching full`).

The student is a ConvNet of width 128 (depth 4) on 64 px images with mini-batch 20 and
N = 100 synthetic pairs, so activations dominate memory. Memory is the peak resident set
size (resource.getrusage ru_maxrss) of the subprocess during the iteration, minus its RSS just
before it; torch's CPU allocations are not visible to tracemalloc, so RSS is what is measured.
Time is the best of `--iters` (>= 3) iterations in the subprocess, as wall and as CPU
seconds (the machine may be shared; CPU time is the steadier figure); the 1-minute load average
is printed at the start. Ratios are against the constant-memory variant at the same syn_steps.
The goal (issue 15): the constant-memory matcher keeps no per-step parameters, so its growth
from 8 to 32 syn_steps is at most 25% of its growth at 8 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REPEATS, best_of, header  # noqa: E402

VARIANTS = {"tesla": "tesla", "graph": "first-order-graph", "full": "full"}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace) -> None:
    """One variant at one syn_steps: print a JSON line with seconds and memory."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import torch

    from mmcurate.distill.losses import get_loss
    from mmcurate.distill.matching import MATCHERS, Segment, SyntheticSet
    from mmcurate.distill.similarity import LowRankSimilarity
    from mmcurate.distill.students import build_student

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    student = build_student(
        f"convnet-w{args.width}-d{args.depth}", args.text_dim, args.size, seed=0
    ).train()
    n = args.pairs
    syn = SyntheticSet(
        images=torch.randn(n, 3, args.size, args.size, requires_grad=True),
        texts=torch.randn(n, args.text_dim, requires_grad=True),
        sim=LowRankSimilarity(n, 10, 1.0),
        eta_img=torch.tensor(0.01, requires_grad=True),
        eta_txt=torch.tensor(0.01, requires_grad=True),
    )
    p_img, p_txt = student.flat()
    seg = Segment(p_img, p_txt, p_img + 1e-3 * torch.randn_like(p_img), p_txt)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randperm(n, generator=gen)[: args.mini_batch] for _ in range(args.steps)]
    matcher, loss_fn = MATCHERS[VARIANTS[args.variant]], get_loss("wbce")
    before = _rss_mb()

    def once() -> tuple[float, float]:
        for leaf in syn.leaves():
            leaf.grad = None
        start, start_cpu = time.perf_counter(), _cpu_seconds()
        matcher(student, loss_fn, syn, seg, batches)
        return time.perf_counter() - start, _cpu_seconds() - start_cpu

    seconds, cpu = best_of(once, key=lambda r: r[1], repeats=args.iters)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = p_img.numel() + p_txt.numel()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": cpu,
                "peak_mb": peak,
                "growth_mb": peak - before,
                "params": params,
            }
        )
    )


def run(variant: str, steps: int, args: argparse.Namespace) -> dict:
    """Measure one configuration in a fresh interpreter."""
    cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(steps)]
    for flag in ("width", "depth", "size", "mini_batch", "pairs", "text_dim", "threads", "iters"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run every variant at every syn_steps and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--mini-batch", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--text-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--iters", type=int, default=REPEATS, help="timed iterations (the best is kept)"
    )
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.variant = args.worker
        args.steps = args.steps[0]
        worker(args)
        return
    print(header("trajectory matching: seconds per iteration and peak memory vs syn_steps"))
    print(
        f"ConvNet w{args.width} d{args.depth}, {args.size} px, mini-batch {args.mini_batch}, "
        f"N={args.pairs}, {args.threads} thread(s); memory = peak RSS growth during the "
        "iteration (fresh subprocess each)"
    )
    results: dict[tuple[str, int], dict] = {}
    for steps in args.steps:
        for variant in args.variants:
            results[variant, steps] = run(variant, steps, args)
            r = results[variant, steps]
            print(
                f"  measured {variant:5s} steps={steps:3d}: {r['seconds']:.2f} s wall, "
                f"{r['cpu_seconds']:.2f} s CPU, +{r['growth_mb']:.0f} MB",
                flush=True,
            )
    head = f"{'variant':8s} {'steps':>5s} {'wall s/it':>9s} {'CPU s/it':>9s} {'peak MB':>8s}"
    print("\n" + head + f" {'growth MB':>10s} {'CPU ×tesla':>11s} {'mem ×tesla':>11s}")
    for steps in args.steps:
        base = results.get(("tesla", steps))
        for variant in args.variants:
            r = results[variant, steps]
            ratios = ""
            if base:
                ratios = (
                    f" {r['cpu_seconds'] / base['cpu_seconds']:11.2f}"
                    f" {r['growth_mb'] / base['growth_mb']:11.2f}"
                )
            print(
                f"{variant:8s} {steps:5d} {r['seconds']:9.2f} {r['cpu_seconds']:9.2f} "
                f"{r['peak_mb']:8.0f} {r['growth_mb']:10.0f}{ratios}"
            )
    lo, hi = min(args.steps), max(args.steps)
    if "tesla" in args.variants and lo != hi:
        a, b = results["tesla", lo], results["tesla", hi]
        extra = b["growth_mb"] - a["growth_mb"]
        verdict = "met" if extra <= 0.25 * a["growth_mb"] else "NOT met"
        print(
            f"\ngoal: tesla growth from {lo} to {hi} steps {extra:+.0f} MB <= 25% of its growth "
            f"at {lo} steps ({a['growth_mb']:.0f} MB -> {0.25 * a['growth_mb']:.0f} MB): "
            f"{verdict} ({extra / a['growth_mb']:.1%}); |θ| = {a['params']:,} floats = "
            f"{a['params'] * 4 / 2**20:.1f} MB per snapshot the old matcher kept"
        )


if __name__ == "__main__":
    main()
