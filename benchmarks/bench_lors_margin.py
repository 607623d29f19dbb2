"""LoRS against its baselines on the built-in corpus, at the demo's compute, over several seeds.

    python benchmarks/bench_lors_margin.py                 # seeds 0 1 2, two seeds at a time
    python benchmarks/bench_lors_margin.py --seeds 0 --jobs 1 --set eta_param=log

Per seed s: 400 real training pairs and 500 test pairs of the procedural corpus
(`mmcurate.demo.corpus.make_pairs`, seeds 1000 + s and 2000 + s, 32 px), the demo's budget
(buffers of 8 experts × 4 epochs at batch 32, CLIP mean/std, squash, full batches, no
augmentation as in the demo (`--buffer-set augment=true` for the reference's); the `tiny` preset,
N = 20, mini-batch 10, 300 iterations; 3 evaluation students × 100 epochs, last epoch), and
four training sets:
- LoRS-20: the distilled set (learned S, WBCE, learned η);
- MTT-20: the same distillation with S fixed to I and cross-entropy (the ablation of S);
- random-20: 20 real pairs with distinct images, a new draw for each student, independent of
  the distillation's initial pairs (its std includes the subset's variance);
- full: all 400 real pairs.
The table gives each set's R@K (mean over the seeds of the mean over students) and, for the
mean R@K, ± the std over seeds. Each seed runs in its own process (1 thread); the seeds are the
repeats, and the 1-minute load average is printed at the start.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import header  # noqa: E402

TEXT = "hf-text:mmc-tiny-bert"
SETS = ("LoRS-20", "MTT-20", "random-20", "full")
KEYS = ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10")


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def overrides(items: list[str]) -> dict:
    """KEY=VALUE strings as a dict of typed values."""
    return {k: _value(v) for k, v in (item.split("=", 1) for item in items)}


def one_seed(seed: int, args: argparse.Namespace) -> dict:
    """Buffers, LoRS, MTT and the four evaluations for one seed; their mean R@K per set."""
    import torch

    from mmcurate.demo.corpus import make_pairs
    from mmcurate.distill import (
        BufferConfig,
        EvalConfig,
        load_buffers,
        make_buffers,
        pairs_from_arrays,
        resolve_config,
    )
    from mmcurate.distill.distiller import distill
    from mmcurate.distill.evaluate import (
        artifact_set,
        evaluate_small_set,
        expert_recall,
        full_set,
        mtt_artifact,
        random_set,
        student_recall,
        summarize_students,
    )
    from mmcurate.engine import LocalExecutor
    from mmcurate.metrics.retrieval import mean_recall

    torch.set_num_threads(1)
    began = time.perf_counter()
    train_raw = make_pairs(args.train, seed=1000 + seed)
    test_raw = make_pairs(args.test, seed=2000 + seed)
    train = pairs_from_arrays(train_raw["images"], train_raw["captions"], TEXT)
    test = pairs_from_arrays(test_raw["images"], test_raw["captions"], TEXT)
    buffer = BufferConfig(
        experts=8,
        epochs=4,
        batch_size=32,
        image_encoder="convnet-tiny",
        text_encoder=TEXT,
        image_size=32,
        seed=seed,
        **{"augment": False, **overrides(args.buffer_set)},
    )
    with tempfile.TemporaryDirectory() as tmp:
        make_buffers(train, Path(tmp) / "buf", buffer, LocalExecutor(1, 1), device="cpu")
        buffers = load_buffers(Path(tmp) / "buf")
        demo = {"pairs": 20, "mini_batch": 10, "iterations": 300, "seed": seed}
        config = resolve_config("tiny", **{**demo, **overrides(args.set)})
        art = distill(train, buffers, config, progress=False)
        mtt = mtt_artifact(art, train, buffers, progress=False)
        experts = [
            float(np.mean([mean_recall(r) for r in expert_recall(buffers, test, epoch)]))
            for epoch in range(buffers.epochs + 1)
        ]
    ev = EvalConfig(num_eval=3, epochs=100, seed=seed)
    results = {
        "LoRS-20": evaluate_small_set(artifact_set(art), test, ev, progress=False),
        "MTT-20": evaluate_small_set(artifact_set(mtt), test, ev, progress=False),
        "random-20": summarize_students(
            [
                student_recall(random_set(art, train, 20, ev.seed, k), test, ev, k, "cpu")
                for k in range(ev.num_eval)
            ]
        ),
        "full": evaluate_small_set(full_set(art, train), test, ev, progress=False),
    }
    return {
        "seed": seed,
        "seconds": round(time.perf_counter() - began, 1),
        "lr": [art["lr_img"], art["lr_txt"]],
        "targets": [config.expert_epochs, config.max_start_epoch - 1 + config.expert_epochs],
        "experts": experts,
        "sets": {
            name: {"mean_recall": r["mean_recall"], **{k: r["summary"][k]["mean"] for k in KEYS}}
            for name, r in results.items()
        },
    }


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    """One seed in a fresh single-threaded interpreter."""
    cmd = [sys.executable, __file__, "--worker", str(seed), "--train", str(args.train)]
    cmd += ["--test", str(args.test), "--set", *args.set, "--buffer-set", *args.buffer_set]
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    import os

    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if out.returncode:
        raise RuntimeError(f"seed {seed} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    """The markdown table: R@K per set (mean over seeds), mean R@K ± std over seeds."""
    lines = [
        "| trained on | " + " | ".join(KEYS) + " | mean R@K (± std over seeds) |",
        "|---|" + "---:|" * (len(KEYS) + 1),
    ]
    for name in SETS:
        cells = [f"{np.mean([r['sets'][name][k] for r in rows]):.1f}" for k in KEYS]
        means = [r["sets"][name]["mean_recall"] for r in rows]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {np.mean(means):.2f} ± {np.std(means):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run the seeds, print per-seed lines, the table and the margin verdict."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="seeds run at the same time")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--set", nargs="*", default=[], help="distill KEY=VALUE overrides")
    parser.add_argument("--buffer-set", nargs="*", default=[], help="buffer KEY=VALUE overrides")
    parser.add_argument("--json", default=None, help="write the per-seed results here")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(one_seed(args.worker, args)))
        return
    print(header("LoRS vs MTT vs random vs full on the built-in corpus (demo compute)", repeats=1))
    print(
        f"one run per seed {args.seeds}; settings: distill {args.set or 'tiny preset'}, "
        f"buffers {args.buffer_set or 'augment=false (as the demo)'}"
    )
    began = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda s: run_seed(s, args), args.seeds))
    for r in rows:
        margin = r["sets"]["LoRS-20"]["mean_recall"] - r["sets"]["random-20"]["mean_recall"]
        print(
            f"seed {r['seed']}: "
            + ", ".join(f"{n} {r['sets'][n]['mean_recall']:.2f}" for n in SETS)
            + f"; LoRS - random {margin:+.2f}; η {r['lr'][0]:.3g}/{r['lr'][1]:.3g}; "
            f"{r['seconds']:.0f} s"
        )
    print("\n" + table(rows))
    experts = np.mean([r["experts"] for r in rows], axis=0)
    first, last = rows[0]["targets"]
    print(
        "\nthe experts' own mean R@K after each buffer epoch (mean over experts and seeds; "
        f"the matched segments end at epochs {first}-{last}):\n"
        + ", ".join(f"epoch {e} {v:.2f}" for e, v in enumerate(experts))
    )
    margins = [
        r["sets"]["LoRS-20"]["mean_recall"] - r["sets"]["random-20"]["mean_recall"] for r in rows
    ]
    verdict = "met" if np.mean(margins) >= 2.4 else "NOT met"
    print(
        f"\nLoRS-20 - random-20: {np.mean(margins):+.2f} mean R@K over seeds {args.seeds} "
        f"(per seed {', '.join(f'{m:+.2f}' for m in margins)}); goal >= +2.4: {verdict}; "
        f"wall {time.perf_counter() - began:.0f} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
