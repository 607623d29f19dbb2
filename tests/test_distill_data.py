"""Real pairs for distillation: Karpathy JSON, shards, caption cleaning, the encode-once cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmcurate.data.shards import iter_samples
from mmcurate.demo.corpus import generate_corpus
from mmcurate.distill.data import clean_caption, load_pairs, prepare_pairs
from mmcurate.distill.sources import decode_bytes
from mmcurate.embed import load_encoder
from mmcurate.errors import UsageError

TEXT = "hf-text:mmc-tiny-bert"


def test_clean_caption_strips_only_the_reference_characters():
    # the reference (BLIP's pre_caption): .!"()*#:;~ become spaces, other punctuation stays
    assert clean_caption("A Dog, running! (fast)") == "a dog, running fast"
    assert clean_caption('Two "kids" jump: high; ~ok* #1.') == "two kids jump high ok 1"
    assert clean_caption("A man's mountain-bike & a child's hat?") == (
        "a man's mountain-bike & a child's hat?"
    )
    assert clean_caption("  spaced   out. \n") == "spaced out"
    long = " ".join(f"W{i}." for i in range(40))
    assert clean_caption(long) == " ".join(f"w{i}" for i in range(30))


def _karpathy(tmp_path):
    """A Flickr-style layout: root/annotations/*.json with paths relative to root."""
    root = tmp_path / "flickr"
    (root / "images").mkdir(parents=True)
    colours = {"a.png": (255, 0, 0), "b.png": (0, 255, 0), "c.png": (0, 0, 255)}
    for name, colour in colours.items():
        Image.new("RGB", (40, 20), colour).save(root / "images" / name)
    (root / "images" / "broken.jpg").write_bytes(b"not an image")
    train = [
        {"image": "images/a.png", "caption": "A red thing.", "image_id": 0},
        {"image": "images/b.png", "caption": "A green thing!", "image_id": 1},
        {"image": "images/a.png", "caption": "Red, again", "image_id": 0},
        {"image": "images/broken.jpg", "caption": "lost", "image_id": 2},
        {"image": "images/c.png", "caption": "  ", "image_id": 3},
    ]
    test = [
        {"image": "images/b.png", "caption": ["green one", "green two"]},
        {"image": "images/c.png", "caption": ["blue one", "blue two", "blue three"]},
    ]
    (root / "annotations").mkdir()
    (root / "annotations" / "train.json").write_text(json.dumps(train))
    (root / "annotations" / "test.json").write_text(json.dumps(test))
    return root


def test_karpathy_json_train_and_test(tmp_path):
    root = _karpathy(tmp_path)
    cache = tmp_path / "cache"
    train = load_pairs(
        str(root / "annotations" / "train.json"), image_size=8, text_encoder=TEXT, cache_dir=cache
    )
    assert train.captions == ["A red thing.", "Red, again", "A green thing!"]
    assert train.image_index.tolist() == [0, 0, 1] and train.n_images == 2
    assert train.skipped == {"undecodable_image": 1, "missing_caption": 1}
    assert train.images.shape == (2, 8, 8, 3) and train.images.dtype == np.uint8
    assert tuple(train.images[0, 4, 4]) == (255, 0, 0)
    assert tuple(train.pixels([2])[0, 0, 0].tolist()) == (0, 255, 0)
    assert len(set(train.uids)) == 3
    encoder = load_encoder(TEXT, "cpu")
    expected = encoder.encode_texts(["a red thing", "red, again", "a green thing"], normalize=False)
    assert torch.allclose(train.texts, expected, atol=1e-5)

    test = load_pairs(
        str(root / "annotations" / "test.json"),
        image_size=8,
        text_encoder=TEXT,
        cache_dir=cache,
        image_root=str(root),
    )
    assert test.n_images == 2 and test.n_pairs == 5
    assert test.image_index.tolist() == [0, 0, 1, 1, 1]


def test_cache_encodes_once_and_bad_paths(tmp_path):
    root = _karpathy(tmp_path)
    data = str(root / "annotations" / "train.json")
    cache = tmp_path / "cache"
    stem = prepare_pairs(data, image_size=8, text_encoder=TEXT, cache_dir=cache)
    files = sorted(p.name for p in cache.iterdir())
    assert files == [f"{stem}{s}" for s in (".done.json", ".images.npy", ".npz", ".parquet")]
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert prepare_pairs(data, image_size=8, text_encoder=TEXT, cache_dir=cache) == stem
    assert stamps == {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    other = prepare_pairs(data, image_size=12, text_encoder=TEXT, cache_dir=cache)
    assert other != stem

    with pytest.raises(UsageError, match="image root not found"):
        load_pairs(
            str(root / "annotations" / "test.json"),
            image_size=8,
            text_encoder=TEXT,
            cache_dir=cache,
            image_root=str(tmp_path / "missing"),
        )
    elsewhere = tmp_path / "a" / "b" / "test.json"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_text((root / "annotations" / "test.json").read_text())
    with pytest.raises(UsageError, match="pass --image-root DIR"):
        load_pairs(str(elsewhere), image_size=8, text_encoder=TEXT, cache_dir=cache)
    with pytest.raises(UsageError, match="not found"):
        load_pairs(str(tmp_path / "nope.json"), image_size=8, text_encoder=TEXT, cache_dir=cache)
    with pytest.raises(UsageError, match="hf-text"):
        load_pairs(data, image_size=8, text_encoder="timm:mmc-tiny", cache_dir=cache)


def test_shards_with_a_broken_shard(tmp_path, monkeypatch):
    """The images of a shard that breaks half-way are taken back out of the streamed cache
    (which starts at 2 rows here, so it also has to grow)."""
    monkeypatch.setattr("mmcurate.distill.data.SHARD_CAPACITY", 2)
    paths = generate_corpus(tmp_path / "shards", n_shards=3, per_shard=5, seed=1, image_size=16)
    good = [s for p in (paths[0], paths[2]) for s in iter_samples(str(p))]
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 3000])
    with pytest.warns(UserWarning, match="shard left out: 00001"):
        pairs = load_pairs(
            str(tmp_path / "shards"), image_size=16, text_encoder=TEXT, cache_dir=tmp_path / "c"
        )
    assert pairs.n_pairs == 10 and pairs.skipped == {"broken_shard": 1}
    assert pairs.image_index.tolist() == list(range(10))
    assert pairs.texts.shape == (10, 64)
    assert pairs.uids == [s["uid"] for s in good]
    expected = np.stack([decode_bytes(s["image"], 16, "squash") for s in good])
    assert np.array_equal(np.asarray(pairs.images), expected)


def test_resize_mode_names_the_cache_and_shapes_the_images(tmp_path):
    """squash (the reference's Resize((s, s))) keeps a thin left stripe that the centre crop
    of the shorter-side resize cuts off; each mode has its own cache stem."""
    root = tmp_path / "img"
    root.mkdir()
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    wide.paste((0, 255, 0), (0, 0, 5, 20))
    wide.save(root / "wide.png")
    ann = root / "train.json"
    ann.write_text(json.dumps([{"image": "wide.png", "caption": "a stripe", "image_id": 0}]))
    cache = tmp_path / "cache"
    options = {"image_size": 8, "text_encoder": TEXT, "cache_dir": cache}
    squash = load_pairs(str(ann), resize="squash", **options)
    crop = load_pairs(str(ann), resize="crop", **options)
    assert squash.resize == "squash" and crop.resize == "crop"
    assert squash.images[0, 4, 0, 1] > 200 and squash.images[0, 4, 7, 0] > 200
    assert crop.images[0, 4, 0, 0] > 200 and crop.images[0, 4, 0, 1] < 50
    with Image.open(root / "wide.png") as im:
        expected = np.asarray(im.convert("RGB").resize((8, 8), Image.BICUBIC))
    assert np.array_equal(squash.images[0], expected)
    stems = {p.name.split(".")[0] for p in cache.glob("*.done.json")}
    assert len(stems) == 2
    with pytest.raises(UsageError, match="unknown resize mode 'stretch'"):
        load_pairs(str(ann), resize="stretch", **options)


RSS_SCRIPT = """
import json, re, sys
from mmcurate.distill.data import load_text_encoder, prepare_pairs

def kib(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

small, data, cache, size = sys.argv[1:5]
load_text_encoder("hf-text:mmc-tiny-bert", "cpu")
# warm the code paths and the text encoder's full batches on tiny images first
prepare_pairs(small, image_size=8, text_encoder="hf-text:mmc-tiny-bert",
              cache_dir=cache + "-warm", device="cpu")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
base = kib("VmRSS")
prepare_pairs(data, image_size=int(size), text_encoder="hf-text:mmc-tiny-bert",
              cache_dir=cache, device="cpu")
print(json.dumps({"growth": (kib("VmHWM") - base) * 1024}))
"""


def test_cache_build_holds_the_pixels_about_once(tmp_path):
    """Peak RSS growth while building the cache stays within 1.3 × one copy of the pixels
    (a list of decoded images followed by np.stack would need two)."""
    import subprocess
    import sys

    n, size = 400, 128
    generate_corpus(tmp_path / "small", n_shards=1, per_shard=n, seed=2, image_size=8)
    generate_corpus(tmp_path / "data", n_shards=4, per_shard=n // 4, seed=3, image_size=size)
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "small"), str(tmp_path / "data")]
        + [str(tmp_path / "cache"), str(size)],
        capture_output=True,
        text=True,
        check=True,
    )
    growth = json.loads(out.stdout.strip().splitlines()[-1])["growth"]
    pixels = n * size * size * 3
    print(
        f"\ncache build: peak RSS growth {growth / 2**20:.2f} MiB = {growth / pixels:.2f} x "
        f"the pixels ({pixels / 2**20:.2f} MiB)"
    )
    assert growth <= 1.3 * pixels
