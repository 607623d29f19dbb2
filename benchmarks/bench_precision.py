"""Agreement of negCLIPLoss at tf32 and bf16 matmul precision with fp32, measured on the CPU.

    python benchmarks/bench_precision.py                     # 1 M pairs, d=768, B=32768, K=1
    python benchmarks/bench_precision.py --pairs 20000 --batch 2048 --d 128   # a quick check

A float16 store of N CLIP-like pairs (clustered images, captions of varied alignment, 10%
misaligned, 1% near-duplicates) is written, read back as one window, copied once as float16
(as `run_score` does), and scored with `negclip_scores` at each precision and τ. On the CPU the
library emulates the GPU's arithmetic: tf32 rounds the inputs to a 10-bit mantissa and bf16 to
bfloat16, both accumulating and returning float32 (TF32 does not exist on a CPU; this CPU's
native bf16 matmul runs at well under 1 GFLOP/s). A check on one batch shows the bf16
emulation gives the native bf16 matmul's products (its float32 sums rounded to bf16 agree).

Agreement is per batch (every batch is computed in full at each precision), so K = 1 shows
what K = 10 would; the report gives Spearman's rank correlation with fp32, the overlap of
the top 30%, and the largest absolute difference. Each batch's products are computed once per
precision and give every τ (`batch_logsumexps`); a check at small size first shows this loop
returns exactly what `negclip_scores` returns for each precision and τ.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import header

from mmcurate.curate.rows import torch_device
from mmcurate.curate.scores import batch_logsumexps, clipscore, negclip_batching, negclip_scores
from mmcurate.curate.windows import WindowRows
from mmcurate.data.store import read_stem, write_stem
from mmcurate.engine import pin_threads

PRECISIONS = ("fp32", "tf32", "bf16")


def clip_like(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit image/text rows: 1000 image clusters, captions aligned between 0.10 and 0.45 with
    their image (10% aligned with another image instead, 1% near-duplicates at 0.95)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    img = centres[rng.integers(0, 1000, n)] + 1.2 * rng.standard_normal((n, d), np.float32) / d**0.5
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    noise = rng.standard_normal((n, d), dtype=np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    partner = np.arange(n)
    wrong = rng.random(n) < 0.10
    partner[wrong] = rng.integers(0, n, int(wrong.sum()))
    mix = rng.uniform(0.10, 0.45, (n, 1)).astype(np.float32)
    mix[rng.random(n) < 0.01] = 0.95
    txt = mix * img[partner] + np.sqrt(1 - mix**2) * noise
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img.astype(np.float16), txt.astype(np.float16)


def write_store(root: Path, n: int, d: int, stem_rows: int) -> list[str]:
    """The pairs as a float16 store of `stem_rows`-row stems; returns the stems."""
    import pyarrow as pa

    stems = []
    for i, r0 in enumerate(range(0, n, stem_rows)):
        rows = min(stem_rows, n - r0)
        img, txt = clip_like(rows, d, seed=i)
        meta = pa.table({"uid": [f"{i:016x}{j:016x}" for j in range(rows)]})
        write_stem(root, f"{i:05d}", meta, {"img": img, "txt": txt}, {})
        stems.append(f"{i:05d}")
    return stems


def read_window(root: Path, stems: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole store as one window, copied once to the CPU as float16 (what run_score does)."""
    parts = {"img": [], "txt": []}
    for stem in stems:
        _, arrays = read_stem(root, stem, ["img", "txt"])
        for key in parts:
            arr = arrays[key]
            parts[key].append((arr, np.arange(len(arr))))
    dim = parts["img"][0][0].shape[1]
    dev = torch_device("cpu")
    return tuple(WindowRows(parts[k], dim).tensor(dev) for k in ("img", "txt"))


def negclip_all(
    img: torch.Tensor, txt: torch.Tensor, taus: list[float], batch: int, k: int
) -> dict[tuple[str, float], np.ndarray]:
    """negclip at every precision and τ, each batch's products computed once per precision."""
    n = len(img)
    reg = {(p, t): np.zeros(n) for p in PRECISIONS for t in taus}
    for kk in range(k):
        batching = negclip_batching(n, batch, (0, 0), kk)
        for members, scored in zip(batching.index, batching.scored, strict=True):
            idx = torch.from_numpy(members)
            f, g = img.index_select(0, idx), txt.index_select(0, idx)
            for p in PRECISIONS:
                for tau, (rows, cols) in zip(taus, batch_logsumexps(f, g, taus, precision=p)):
                    r = (0.5 * tau) * (rows.double() + cols.double())
                    reg[p, tau][members[scored]] += r.numpy()[scored]
    clip = clipscore(img, txt).astype(np.float64)
    return {key: (clip - total / k).astype(np.float32) for key, total in reg.items()}


def check_against_the_library(taus: list[float]) -> None:
    """The loop above gives exactly negclip_scores' output for every precision and τ."""
    img, txt = (torch.from_numpy(a) for a in clip_like(6000, 64, seed=5))
    mine = negclip_all(img, txt, taus, 1024, 2)
    for (p, tau), got in mine.items():
        lib = negclip_scores(img, txt, tau=tau, batch_size=1024, k=2, seed=(0, 0), precision=p)
        if not np.array_equal(got, lib):
            raise SystemExit(f"benchmark loop differs from negclip_scores at {p}, τ={tau}")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties are negligible in float32 scores)."""
    ra = np.empty(len(a))
    rb = np.empty(len(b))
    ra[np.argsort(a, kind="stable")] = np.arange(len(a))
    rb[np.argsort(b, kind="stable")] = np.arange(len(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def top_overlap(a: np.ndarray, b: np.ndarray, fraction: float = 0.3) -> float:
    """|top f of a ∩ top f of b| / (f·N), ties to the smaller index."""
    k = int(fraction * len(a))
    top_a = np.argsort(-a, kind="stable")[:k]
    top_b = np.argsort(-b, kind="stable")[:k]
    return len(np.intersect1d(top_a, top_b)) / k


def native_bf16_check(d: int, b: int = 1024) -> dict:
    """On one batch: the CPU's native bf16 matmul (bf16 output) against the emulation (bf16
    inputs, float32 product) rounded to bf16: share of identical outputs, largest difference."""
    img, txt = clip_like(b, d, seed=99)
    f, g = torch.from_numpy(img).float(), torch.from_numpy(txt).float()
    native = (f.bfloat16() @ g.bfloat16().t()).float()
    emulated = f.bfloat16().float() @ g.bfloat16().float().t()
    rounded = emulated.bfloat16().float()
    return {
        "batch": b,
        "identical": float((native == rounded).float().mean()),
        "max_abs_native_vs_emulated": float((native - rounded).abs().max()),
        "max_abs_bf16_output_vs_float32_output": float((native - emulated).abs().max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--batch", type=int, default=32768)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--taus", type=float, nargs="+", default=[0.01, 0.07])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stem-rows", type=int, default=10_000)
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    pin_threads(args.threads)
    print(header(f"negclip precision agreement with fp32 on CPU ({args.threads} threads)", 1))
    print("(one run: agreement is a property of the arithmetic, not of timing)")
    check_against_the_library(args.taus)
    work = Path(tempfile.mkdtemp(prefix="mmc_prec_", dir=args.work_dir))
    results: dict = {"config": vars(args), "runs": {}, "native_bf16": native_bf16_check(args.d)}
    try:
        stems = write_store(work, args.pairs, args.d, args.stem_rows)
        img, txt = read_window(work, stems)
        start = time.perf_counter()
        scores = negclip_all(img, txt, args.taus, args.batch, args.k)
        results["seconds"] = round(time.perf_counter() - start, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for (precision, tau), got in scores.items():
        ref = scores["fp32", tau]
        results["runs"][f"{tau:g}/{precision}"] = {
            "tau": tau,
            "precision": precision,
            "spearman": spearman(ref, got),
            "top30_overlap": top_overlap(ref, got),
            "max_abs_diff": float(np.abs(ref - got).max()),
            "negclip_std": float(ref.std()),
        }
    nb = results["native_bf16"]
    print(
        f"\n## negclip at tf32 and bf16 against fp32: {args.pairs:,} pairs, d={args.d}, "
        f"B={args.batch}, K={args.k}, window = all pairs (CPU, emulated tf32/bf16)\n"
    )
    print("| τ | precision | Spearman vs fp32 | top-30% overlap | max abs diff | negclip std |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in sorted(results["runs"].values(), key=lambda r: (r["tau"], r["precision"] != "fp32")):
        print(
            f"| {r['tau']:g} | {r['precision']} | {r['spearman']:.6f} | "
            f"{r['top30_overlap']:.5f} | {r['max_abs_diff']:.2e} | {r['negclip_std']:.4f} |"
        )
    print(f"\n(all precisions and τ in {results['seconds']:.0f} s)")
    print(
        f"\nbf16 emulation vs this CPU's native bf16 matmul on a {nb['batch']}-pair batch: "
        f"{nb['identical']:.4f} of the products identical after rounding the emulation to bf16 "
        f"(largest difference {nb['max_abs_native_vs_emulated']:.1e}); rounding the output to "
        f"bf16 as the CPU does moves it by up to {nb['max_abs_bf16_output_vs_float32_output']:.1e}"
        ", which CUDA avoids with a float32 output"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
