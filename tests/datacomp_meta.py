"""Test helpers: a DataComp-shaped metadata directory with written-out rows, and a small WordNet
in NLTK's on-disk format (real reader, no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

L14 = "clip_l14_similarity_score"
B32 = "clip_b32_similarity_score"

# (text, original_width, original_height, clip_l14, clip_b32); uid i is f"{i:032x}".
ROWS = [
    ("A photo of a dog on the beach", 640, 480, 0.31, 0.30),  # 0: fastText en, CLD3 ga
    ("Un chien sur la plage avec ses amis", 640, 480, 0.35, 0.33),  # 1: fr
    ("red car", 640, 480, 0.29, 0.29),  # 2: en, 2 words
    ("a small cat sitting on a sofa", 150, 300, 0.30, 0.27),  # 3: shorter side 150
    ("a wide panorama of the mountains at sunset", 1000, 200, 0.26, 0.25),  # 4: aspect 5
    ("a tall tower in the old city centre", 300, 900, 0.27, 0.28),  # 5: aspect 3.0
    ("", 640, 480, 0.20, 0.20),  # 6: empty
    ("a dog\nrunning in the park", 640, 480, 0.33, 0.31),  # 7: newline
    ("   ", 640, 480, 0.10, 0.10),  # 8: whitespace
    ("Der Hund läuft schnell durch den Park", 640, 480, 0.34, 0.32),  # 9: de
    ("Dogs and a car", 500, 500, 0.32, 0.28),  # 10: en, in21k words via morphy
    ("a bank by the river", 800, 600, 0.28, 0.30),  # 11: en, bank's first synset not in21k
]
STEMS = (range(0, 6), range(6, 12))


def uid(i: int) -> str:
    return f"{i:032x}"


def datacomp_meta(root: Path, dim: int = 8, seed: int = 0, img: np.ndarray | None = None) -> Path:
    """`<stem>.parquet` (uid, url, text, original sizes, both CLIP scores) and `<stem>.npz`
    (l14_img, l14_txt) as DataComp ships them; no done markers."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    if img is None:
        img = rng.standard_normal((len(ROWS), dim)).astype(np.float16)
    for s, rows in enumerate(STEMS):
        rows = list(rows)
        table = pa.table(
            {
                "uid": [uid(i) for i in rows],
                "url": [f"https://example.com/{i}.jpg" for i in rows],
                "text": [ROWS[i][0] for i in rows],
                "original_width": pa.array([ROWS[i][1] for i in rows], pa.int64()),
                "original_height": pa.array([ROWS[i][2] for i in rows], pa.int64()),
                L14: pa.array([ROWS[i][3] for i in rows], pa.float64()),
                B32: pa.array([ROWS[i][4] for i in rows], pa.float64()),
            }
        )
        pq.write_table(table, root / f"{s:08d}.parquet")
        txt = rng.standard_normal((len(rows), img.shape[1])).astype(np.float16)
        np.savez(root / f"{s:08d}.npz", l14_img=img[rows], l14_txt=txt)
    return root


# (pos, offset, lemma): WordNet synsets of the fixture, in index order per lemma.
WORDNET = [
    ("n", 2084071, "dog"),  # n02084071, an ImageNet-21k wnid
    ("n", 2958343, "car"),  # n02958343, an ImageNet-21k wnid
    ("n", 1740, "bank"),  # n00001740, not a wnid: bank's first synset
    ("n", 9217230, "bank"),  # n09217230, a wnid, but bank's second synset
    ("n", 4256520, "sofa"),  # n04256520, a wnid
    ("v", 1543123, "sit"),
]
_LEXNAMES = ["adj.all\t3", "adj.pert\t3", "adv.all\t4", "noun.Tops\t1", "verb.body\t2"]
_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}


def write_wordnet(data_root: Path) -> Path:
    """An nltk_data root whose `corpora/wordnet` (index.*, data.*, *.exc, lexnames) holds
    WORDNET; each data line sits at the byte offset it names, as NLTK's reader requires."""
    root = data_root / "corpora" / "wordnet"
    root.mkdir(parents=True, exist_ok=True)
    (root / "lexnames").write_text("".join(f"{i:02d}\t{x}\n" for i, x in enumerate(_LEXNAMES)))
    for name in ("index.sense", "cntlist.rev"):
        (root / name).write_text("")
    for pos, suffix in _FILES.items():
        (root / f"{suffix}.exc").write_text("")
        entries = sorted((o, lemma) for p, o, lemma in WORDNET if p == pos)
        data = bytearray()
        for offset, lemma in entries:
            gap = offset - len(data)
            data += b"  " + b" " * (gap - 3) + b"\n"
            line = f"{offset:08d} 03 {pos} 01 {lemma} 0 000 | a {lemma}\n"
            data += line.encode()
        (root / f"data.{suffix}").write_bytes(bytes(data))
        lemmas: dict[str, list[int]] = {}
        for p, o, lemma in WORDNET:
            if p == pos:
                lemmas.setdefault(lemma, []).append(o)
        lines = [
            f"{lemma} {pos} {len(offs)} 0 {len(offs)} 0 {' '.join(f'{o:08d}' for o in offs)}  \n"
            for lemma, offs in sorted(lemmas.items())
        ]
        (root / f"index.{suffix}").write_text("".join(lines))
    return data_root
