"""GPU acceptance run: every GPU path of mmcurate measured once, on one CUDA GPU, in minutes.

    python benchmarks/gpu_acceptance.py --out DIR               # on a CUDA machine
    python benchmarks/gpu_acceptance.py --out DIR --cpu-dry-run # the same script, tiny, on CPU

Prints one table and writes DIR/gpu_acceptance.json (rewritten after every section, so a run
cut short keeps what it measured). Sections (`--sections` picks some):

1. embed: open_clip ViT-B-32 and ViT-L-14, random init, 224 px, on 2 shards of 2,000 synthetic
   JPEGs, image tower: images/s of a model-only loop on tensors decoded beforehand, and of the
   embed stage with CPU decoding (DataLoader workers) and with GPU decoding (`--decode gpu`).
2. score: negclip over a 1 M-pair float16 store, d=768, B=32768, K=10 at the default precision
   (K=2 at the others): pairs/s, and the fraction of the matmul peak measured in this run for
   that precision; agreement of fp32, tf32 and bf16 with a float64 oracle on 16,384 pairs.
3. normsim_inf: 1 M candidates x 100k targets through faiss-gpu when importable, else torch on
   the GPU (faiss-cpu is what the wheels bring); checked against torch on the CPU for 1,000.
4. buffer + distill: the flickr-100 preset's shapes (99 pairs, 8 steps, mini-batch 20) with a
   random-init nfnet_l0 student at 224 px and 768-d text features on synthetic pairs: one
   expert epoch, and s/iteration and peak GPU memory of --matching tesla and full, 20
   iterations each (learned step sizes held fixed, lr_lr = 0: random pairs are no data to
   learn them from, and the cost per iteration is the same).
5. demo: the demo pipeline (`--size 0.2`, one corpus and teacher) on the CPU and on the GPU;
   its figures must agree within the tolerances printed beside them (exit 1 when not).

The machine needs no network: Python 3.12 with torch, torchvision, timm, transformers, pyarrow,
numpy, click, tqdm, matplotlib and pillow, the wheels of benchmarks/gpu_wheels.sh installed,
and PYTHONPATH=. from the source tree.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_precision import clip_like, spearman, top_overlap, write_store  # noqa: E402
from harness import load_average  # noqa: E402

SECTIONS = ("embed", "score", "normsim", "distill", "demo")
DEMO_TOLERANCE = {"auroc": 0.02, "selection_jaccard": 0.9, "retrieval_mean": 3.0}


@dataclass(frozen=True)
class Sizes:
    """Every size of the run: the GPU run's, or the CPU dry run's tiny ones."""

    models: tuple[str, ...] = ("open_clip:ViT-B-32", "open_clip:ViT-L-14")
    shard_images: int = 2000
    jpeg_px: int = 256
    embed_batch: int = 256
    score_pairs: int = 1_000_000
    score_dim: int = 768
    score_batch: int = 32768
    score_k: int = 10
    other_k: int = 2
    oracle_pairs: int = 16384
    candidates: int = 1_000_000
    targets: int = 100_000
    check_candidates: int = 1000
    student: str = "nfnet_l0@random"
    student_px: int = 224
    text_encoder: str = "hf-text:bert-base-uncased"
    text_dim: int = 768
    real_pairs: int = 512
    expert_batch: int = 128
    iterations: int = 20
    flickr_pairs: int = 145_000
    demo_size: float = 0.2
    demo_budgets: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=lambda: {"lr_lr": 0.0})


DRY = Sizes(
    models=("open_clip:mmc-tiny",),
    shard_images=24,
    jpeg_px=40,
    embed_batch=8,
    score_pairs=6000,
    score_dim=32,
    score_batch=1024,
    score_k=2,
    other_k=1,
    oracle_pairs=1024,
    candidates=4000,
    targets=500,
    check_candidates=200,
    student="convnet-tiny",
    student_px=32,
    text_encoder="hf-text:mmc-tiny-bert",
    text_dim=64,
    real_pairs=128,
    expert_batch=32,
    iterations=2,
    demo_size=0.1,
    demo_budgets={
        "experts": 2,
        "epochs": 3,
        "iterations": 2,
        "num_eval": 1,
        "eval_epochs": 2,
    },
    overrides={"pairs": 20, "mini_batch": 10, "syn_steps": 2, "lr_lr": 0.0},
)


def sync(dev: torch.device) -> None:
    """Wait for the device's queued work, so wall-clock times are real."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device) -> tuple[Any, float]:
    """(fn(), seconds) with the device synchronised on both sides."""
    sync(dev)
    start = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - start


def local(threads: int | str = "auto"):
    from mmcurate.engine import LocalExecutor

    return LocalExecutor(1, threads)


# --------------------------------------------------------------------------- 1. embed


def write_jpeg_shards(root: Path, sizes: Sizes) -> list[Path]:
    """Two webdataset shards of synthetic JPEG pairs."""
    from mmcurate.data.shard_writer import write_shard
    from mmcurate.demo.corpus import make_pairs, pair_files

    paths = []
    for s in range(2):
        pairs = make_pairs(sizes.shard_images, seed=s, image_size=sizes.jpeg_px)
        items = [
            (f"{s:02d}{i:06d}", pair_files(pairs["images"][i], pairs["captions"][i], {}))
            for i in range(sizes.shard_images)
        ]
        paths.append(write_shard(root / f"{s:05d}.tar", items))
    return paths


def model_only(spec: str, shards: list[Path], batch: int, dev: torch.device) -> float:
    """Images/s of the image tower alone, on tensors decoded and preprocessed beforehand."""
    import webdataset as wds

    from mmcurate.embed import load_encoder
    from mmcurate.embed.decode import decode_image

    enc = load_encoder(spec, str(dev))
    images = [s["jpg"] for p in shards for s in wds.WebDataset(str(p), shardshuffle=False)]
    pixels = torch.stack([decode_image(b, enc.preprocess) for b in images])
    pixels = pixels.to(dev, torch.float16 if dev.type == "cuda" else torch.float32)
    enc.encode_images(pixels[:batch])

    def loop() -> None:
        for i in range(0, len(pixels), batch):
            enc.encode_images(pixels[i : i + batch])

    _, seconds = timed(loop, dev)
    return len(pixels) / seconds


def section_embed(sizes: Sizes, dev: torch.device, work: Path) -> list[dict]:
    from mmcurate.embed.stage import EmbedConfig, run_embed
    from mmcurate.engine import usable_cores

    shards = write_jpeg_shards(work / "shards", sizes)
    workers = max(1, min(8, usable_cores() - 1))
    rows = []
    for spec in sizes.models:
        base = model_only(spec, shards, sizes.embed_batch, dev)
        rows.append(row("embed", f"{spec} model only", base, "images/s", "pre-decoded tensors"))
        for decode in ("cpu", "gpu"):
            config = EmbedConfig(
                spec,
                modality="image",
                batch_size=sizes.embed_batch,
                device=str(dev),
                decode_workers=workers,
                decode=decode,
            )
            out = work / f"store-{spec.split(':')[1]}-{decode}"
            summary, seconds = timed(lambda c=config, o=out: run_embed(shards, o, c, local()), dev)
            if summary["failed"]:
                raise RuntimeError(f"embed failed: {summary['failed']}")
            rate = summary["rows"] / seconds
            note = f"{workers} decode workers" if decode == "cpu" else "decode_jpeg on device"
            rows.append(
                row("embed", f"{spec} stage, {decode} decode", rate, "images/s", note, rate / base)
            )
    return rows


# --------------------------------------------------------------------------- 2. score


def matmul_peak(precision: str, dev: torch.device, n: int = 8192, reps: int = 5) -> float:
    """Best TFLOP/s of an n×d by d×n product at this precision (the negclip shape, d=768)."""
    from mmcurate.curate.precision import cuda_matmul, operand, product

    n = n if dev.type == "cuda" else 1024
    a = operand(torch.randn(n, 768, device=dev), precision)
    b_t = operand(torch.randn(n, 768, device=dev), precision).t()
    out = torch.empty(n, n, device=dev)
    best = 0.0
    with cuda_matmul(precision, dev):
        product(a, b_t, out)
        for _ in range(reps):
            _, seconds = timed(lambda: product(a, b_t, out), dev)
            best = max(best, 2 * n * n * 768 / seconds / 1e12)
    return best


def oracle_negclip(img: torch.Tensor, txt: torch.Tensor, batch: int, tau: float) -> np.ndarray:
    """negclip of one batching (K=1) computed in float64 throughout, for the agreement check."""
    from mmcurate.curate.scores import negclip_batching

    f, g = img.double(), txt.double()
    batching = negclip_batching(len(f), batch, (0, 0), 0)
    out = np.empty(len(f))
    for members, scored in zip(batching.index, batching.scored, strict=True):
        idx = torch.from_numpy(members).to(f.device)
        fb, gb = f.index_select(0, idx), g.index_select(0, idx)
        rows = torch.empty(len(idx), dtype=torch.float64, device=f.device)
        cols = torch.full((len(idx),), -math.inf, dtype=torch.float64, device=f.device)
        for r0 in range(0, len(idx), 1024):
            s = fb[r0 : r0 + 1024] @ gb.t() / tau
            rows[r0 : r0 + 1024] = torch.logsumexp(s, dim=1)
            cols = torch.logaddexp(cols, torch.logsumexp(s, dim=0))
        r = (tau / 2) * (rows + cols)
        clip = (fb * gb).sum(dim=1)
        out[members[scored]] = (clip - r).cpu().numpy()[scored]
    return out


def section_score(sizes: Sizes, dev: torch.device, work: Path) -> list[dict]:
    from mmcurate.curate.precision import resolve_precision
    from mmcurate.curate.score_config import ScoreConfig
    from mmcurate.curate.score_stage import run_score
    from mmcurate.curate.scores import negclip_scores

    store = work / "score-store"
    store.mkdir(parents=True)
    write_store(store, sizes.score_pairs, sizes.score_dim, max(2000, sizes.score_pairs // 100))
    default, _ = resolve_precision(None, dev)
    rows = []
    for precision in (default, *[p for p in ("fp32", "tf32", "bf16") if p != default]):
        k = sizes.score_k if precision == default else sizes.other_k
        config = ScoreConfig(
            metrics=("negclip",),
            batch_size=sizes.score_batch,
            k=k,
            window=sizes.score_pairs,
            temperature=0.01,
            device=str(dev),
            precision=precision,
        )
        out = work / f"scores-{precision}"
        summary, seconds = timed(
            lambda c=config, o=out: run_score(str(store), str(o), c, local()), dev
        )
        ran = summary["precision"]
        batches = math.ceil(sizes.score_pairs / sizes.score_batch) * k
        tflops = batches * 2 * sizes.score_batch**2 * sizes.score_dim / seconds / 1e12
        peak = matmul_peak(ran, dev)
        rows.append(
            row(
                "score",
                f"negclip {precision} (ran {ran}), K={k}",
                summary["rows"] / seconds,
                "pairs/s",
                f"{tflops:.3g} TFLOP/s = {tflops / peak:.2f} of the {ran} matmul peak "
                f"{peak:.3g} TFLOP/s",
                tflops / peak,
            )
        )
    pairs = clip_like(sizes.oracle_pairs, sizes.score_dim, 9)  # float16 rows, as a store holds
    img, txt = (torch.from_numpy(a).to(dev) for a in pairs)
    for tau in (0.01, 0.07):
        oracle = oracle_negclip(img, txt, sizes.oracle_pairs, tau)
        for precision in ("fp32", "tf32", "bf16"):
            if dev.type == "cuda" and resolve_precision(precision, dev)[1]:
                continue  # this GPU lacks it (pre-Ampere): the score rows above say so
            got = negclip_scores(
                *pairs,
                tau=tau,
                batch_size=sizes.oracle_pairs,
                k=1,
                seed=(0, 0),
                device=dev,
                precision=precision,
            )
            diff = float(np.abs(got - oracle).max())
            rows.append(
                row(
                    "score",
                    f"agreement {precision} vs float64, τ={tau:g}",
                    spearman(oracle, got),
                    "Spearman",
                    f"top-30% overlap {top_overlap(oracle, got):.5f}, max |diff| {diff:.1e}",
                )
            )
    return rows


# --------------------------------------------------------------------------- 3. normsim


def clustered(n: int, d: int, centres: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, len(centres), n)]
    x = x + rng.standard_normal((n, d), dtype=np.float32) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def section_normsim(sizes: Sizes, dev: torch.device, work: Path) -> list[dict]:
    from mmcurate.curate.normsim import MaxAbsIndex, normsim_inf_exact

    d = sizes.score_dim
    centres = clustered(1000, d, np.eye(1000, d, dtype=np.float32), 0)
    t = clustered(sizes.targets, d, centres, 1)
    x = clustered(sizes.candidates, d, centres, 2)
    try:
        import faiss

        gpu_faiss = dev.type == "cuda" and faiss.get_num_gpus() > 0
    except ImportError:
        gpu_faiss = False
    if gpu_faiss:
        index = MaxAbsIndex(t, "flat")
        got, seconds = timed(lambda: index.search(x), dev)
        path = "faiss-gpu flat (x and -x)"
    else:
        got, seconds = timed(lambda: normsim_inf_exact(x, t, device=dev), dev)
        path = f"torch blocked matmul on {dev.type} (no faiss-gpu)"
    check = normsim_inf_exact(x[: sizes.check_candidates], t, device="cpu")
    diff = float(np.abs(got[: sizes.check_candidates] - check).max())
    flops = 2 * sizes.candidates * sizes.targets * d / seconds / 1e12
    note = f"{path}; {flops:.3g} TFLOP/s; max |diff| vs CPU {diff:.1e}"
    return [
        row(
            "normsim",
            f"normsim_inf {sizes.candidates:,} x {sizes.targets:,}",
            sizes.candidates / seconds,
            "candidates/s",
            note,
        )
    ]


# --------------------------------------------------------------------------- 4. distill


def synthetic_pairs(sizes: Sizes):
    from mmcurate.distill import PairSet

    rng = np.random.default_rng(0)
    n, px = sizes.real_pairs, sizes.student_px
    return PairSet(
        images=rng.integers(0, 256, (n, px, px, 3), dtype=np.uint8),
        image_index=np.arange(n, dtype=np.int64),
        texts=torch.from_numpy(rng.standard_normal((n, sizes.text_dim), dtype=np.float32)),
        captions=[f"synthetic caption {i}" for i in range(n)],
        uids=[f"{i:032x}" for i in range(n)],
        text_encoder=sizes.text_encoder,
    )


def peak_memory(dev: torch.device) -> float | None:
    """Peak GPU memory allocated since the last reset, GiB (None on the CPU)."""
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def section_distill(sizes: Sizes, dev: torch.device, work: Path) -> list[dict]:
    from mmcurate.distill import BufferConfig, distill, load_buffers, make_buffers, resolve_config

    pairs = synthetic_pairs(sizes)
    epochs = 3
    config = BufferConfig(
        experts=1,
        epochs=epochs,
        batch_size=sizes.expert_batch,
        image_encoder=sizes.student,
        text_encoder=sizes.text_encoder,
        image_size=sizes.student_px,
    )
    from dataclasses import replace

    from mmcurate.distill.buffers import expert_trajectory

    one, three = (
        timed(lambda e=e: expert_trajectory(pairs, replace(config, epochs=e), 0, dev), dev)[1]
        for e in (1, epochs)
    )
    epoch = (three - one) / (epochs - 1)
    flickr = epoch * sizes.flickr_pairs / sizes.real_pairs
    rows = [
        row(
            "distill",
            f"expert epoch, {sizes.real_pairs} pairs, batch {sizes.expert_batch}",
            epoch,
            "s",
            f"(3 epochs - 1 epoch) / 2; Flickr30k ({sizes.flickr_pairs:,} captions) projected: "
            f"{flickr:.0f} s",
        )
    ]
    buffers_dir = work / "buffers"
    summary = make_buffers(
        pairs, buffers_dir, config, local(), cache_dir=work / "cache", device=str(dev)
    )
    if summary["failed"]:
        raise RuntimeError(f"buffer failed: {summary['failed']}")
    buffers = load_buffers(buffers_dir)
    for matching in ("tesla", "full"):
        cfg = resolve_config(
            "flickr-100", iterations=sizes.iterations, matching=matching, **sizes.overrides
        )
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        _, seconds = timed(
            lambda c=cfg: distill(pairs, buffers, c, device=dev, progress=False), dev
        )
        memory = peak_memory(dev)
        mem = f"peak GPU memory {memory:.2f} GiB" if memory is not None else "CPU: no GPU memory"
        rows.append(
            row(
                "distill",
                f"flickr-100 shapes, --matching {matching}",
                seconds / sizes.iterations,
                "s/iteration",
                f"{sizes.student} at {sizes.student_px} px, {sizes.iterations} iterations; {mem}",
            )
        )
    return rows


# --------------------------------------------------------------------------- 5. demo


def demo_plan(sizes: Sizes):
    """The demo's plan at `demo_size`; the dry run also cuts every budget to a minimum."""
    from dataclasses import replace

    from mmcurate.demo.run import DemoPlan

    plan = DemoPlan.scaled(sizes.demo_size, 0)
    if sizes.demo_budgets:
        plan = replace(plan, **sizes.demo_budgets)
    return plan


def demo_run(root: Path, data: dict, plan, device: str, dry: bool) -> dict:
    """The demo's pipeline on `device`, measured as `mmcurate demo` measures it."""
    from mmcurate.data.subset import load_subset
    from mmcurate.demo.measure import measure
    from mmcurate.demo.run import pipeline_config, write_toml
    from mmcurate.pipeline import plan_from_dict, run_pipeline

    root.mkdir(parents=True, exist_ok=True)
    config = {**pipeline_config(root, data, plan, 0), "device": device}
    if dry:
        config["workers"] = 1
        config["distill"] = {**config["distill"], "lr_lr": 0.0}
    write_toml(root / "pipeline.toml", config)
    report = run_pipeline(
        plan_from_dict(config, root / "pipeline.toml"), progress=False, echo=lambda _: None
    )
    measured = measure(root, data, (plan.negclip_batch, plan.negclip_k), 0, report)
    subset = load_subset(root / "run" / "select" / "subset.npy")
    return {"measured": measured, "subset": {tuple(map(int, p)) for p in subset.tolist()}}


def retrieval_mean(measured: dict) -> float:
    """Mean of IR/TR@1/5/10 of the students trained on the distilled set."""
    entry = measured["retrieval"]["distilled"]
    return float(
        np.mean([entry[k]["mean"] for k in ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10")])
    )


def section_demo(sizes: Sizes, dev: torch.device, work: Path) -> list[dict]:
    from mmcurate.demo.run import prepare_data

    plan = demo_plan(sizes)
    data = prepare_data(work / "shared", plan, 0, lambda _: None)
    dry = bool(sizes.demo_budgets)
    cpu = demo_run(work / "cpu", data, plan, "cpu", dry)
    # in the dry run the device is the CPU too: the run is compared with itself
    gpu = cpu if dev.type == "cpu" else demo_run(work / dev.type, data, plan, str(dev), dry)
    rows = []
    for metric in ("clipscore", "negclip"):
        a = cpu["measured"]["analysis"]["auroc"][metric]
        b = gpu["measured"]["analysis"]["auroc"][metric]
        ok = abs(a - b) <= DEMO_TOLERANCE["auroc"]
        rows.append(
            row(
                "demo",
                f"AUROC {metric}, {dev.type} vs cpu",
                b,
                "AUROC",
                f"cpu {a:.3f}; |Δ| <= {DEMO_TOLERANCE['auroc']}: {ok}",
                ok=ok,
            )
        )
    union = cpu["subset"] | gpu["subset"]
    jaccard = len(cpu["subset"] & gpu["subset"]) / max(1, len(union))
    ok = jaccard >= DEMO_TOLERANCE["selection_jaccard"]
    rows.append(
        row(
            "demo",
            f"selected subset, {dev.type} vs cpu",
            jaccard,
            "Jaccard",
            f">= {DEMO_TOLERANCE['selection_jaccard']}: {ok}",
            ok=ok,
        )
    )
    a, b = retrieval_mean(cpu["measured"]), retrieval_mean(gpu["measured"])
    ok = abs(a - b) <= DEMO_TOLERANCE["retrieval_mean"]
    rows.append(
        row(
            "demo",
            f"distilled mean R@K, {dev.type} vs cpu",
            b,
            "R@K",
            f"cpu {a:.2f}; |Δ| <= {DEMO_TOLERANCE['retrieval_mean']}: {ok}",
            ok=ok,
        )
    )
    return rows


# --------------------------------------------------------------------------- the run


def row(
    section: str,
    what: str,
    value: float,
    unit: str,
    note: str = "",
    ratio: float | None = None,
    ok: bool | None = None,
) -> dict:
    """One line of the table."""
    return {
        "section": section,
        "what": what,
        "value": float(value),
        "unit": unit,
        "ratio": ratio,
        "note": note,
        "ok": ok,
    }


def print_table(rows: list[dict]) -> None:
    """The one table of the run."""
    print("\n| section | what | value | unit | ratio | note |")
    print("|---|---|---:|---|---:|---|")
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(
            f"| {r['section']} | {r['what']} | {r['value']:,.4g} | {r['unit']} | {ratio} | "
            f"{r['note']} |"
        )


def environment(dev: torch.device) -> dict:
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": str(dev),
        "load_average_at_start": load_average(),
        "cpus": os.cpu_count(),
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["gpu_memory_gib"] = round(
            torch.cuda.get_device_properties(dev).total_memory / 2**30, 1
        )
    try:
        import faiss

        info["faiss"] = f"{faiss.__version__} ({faiss.get_num_gpus()} GPU(s))"
    except ImportError:
        info["faiss"] = None
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="where gpu_acceptance.json and the data go")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes, on the CPU")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--keep-data", action="store_true", help="keep the generated data")
    args = ap.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}: choose from {', '.join(SECTIONS)}")
    if args.cpu_dry_run:
        dev, sizes = torch.device("cpu"), DRY
    elif torch.cuda.is_available():
        dev, sizes = torch.device("cuda"), Sizes()
    else:
        raise SystemExit("no CUDA device is visible: run with --cpu-dry-run to check the script")
    out = Path(args.out)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result: dict = {"environment": environment(dev), "dry_run": args.cpu_dry_run, "sections": {}}
    functions = {
        "embed": section_embed,
        "score": section_score,
        "normsim": section_normsim,
        "distill": section_distill,
        "demo": section_demo,
    }
    rows: list[dict] = []
    began = time.perf_counter()
    try:
        for name in sections:
            start = time.perf_counter()
            (work / name).mkdir()
            got = functions[name](sizes, dev, work / name)
            result["sections"][name] = {
                "rows": got,
                "seconds": round(time.perf_counter() - start, 1),
            }
            rows += got
            result["seconds"] = round(time.perf_counter() - began, 1)
            (out / "gpu_acceptance.json").write_text(json.dumps(result, indent=2))
            print(
                f"{name}: {result['sections'][name]['seconds']:.0f} s", file=sys.stderr, flush=True
            )
    finally:
        if not args.keep_data:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"mmcurate GPU acceptance on {result['environment'].get('gpu', 'cpu (dry run)')}, "
        f"{result['seconds']:.0f} s"
    )
    print_table(rows)
    failed = [r["what"] for r in rows if r["ok"] is False]
    if failed:
        print(f"\noutside tolerance: {', '.join(failed)}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
