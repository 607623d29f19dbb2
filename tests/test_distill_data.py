"""Real pairs for distillation: Karpathy JSON, shards, caption cleaning, the encode-once cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmcurate.demo.corpus import generate_corpus
from mmcurate.distill.data import clean_caption, load_pairs, prepare_pairs
from mmcurate.embed import load_encoder
from mmcurate.errors import UsageError

TEXT = "hf-text:mmc-tiny-bert"


def test_clean_caption():
    assert clean_caption("A Dog, running! (fast)") == "a dog running fast"
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
    expected = encoder.encode_texts(["a red thing", "red again", "a green thing"], normalize=False)
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
        load_pairs(data, image_size=8, text_encoder="open_clip:mmc-tiny", cache_dir=cache)


def test_shards_with_a_broken_shard(tmp_path):
    paths = generate_corpus(tmp_path / "shards", n_shards=3, per_shard=5, seed=1, image_size=16)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 3000])
    with pytest.warns(UserWarning, match="shard left out: 00001"):
        pairs = load_pairs(
            str(tmp_path / "shards"), image_size=16, text_encoder=TEXT, cache_dir=tmp_path / "c"
        )
    assert pairs.n_pairs == 10 and pairs.skipped == {"broken_shard": 1}
    assert pairs.image_index.tolist() == list(range(10))
    assert pairs.texts.shape == (10, 64)
