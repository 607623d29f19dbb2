"""Expert buffers: file layout, safe loading, executor independence, resume, bad files."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from mmcurate.demo.corpus import generate_corpus
from mmcurate.distill.buffers import (
    BufferConfig,
    derive_seed,
    expert_path,
    load_buffers,
    make_buffers,
)
from mmcurate.distill.students import build_student
from mmcurate.engine import LocalExecutor
from mmcurate.errors import UsageError

CONFIG = BufferConfig(
    experts=2,
    epochs=2,
    batch_size=16,
    image_encoder="convnet-w8-d2",
    text_encoder="hf-text:mmc-tiny-bert",
    image_size=16,
    seed=3,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(root / "shards", n_shards=2, per_shard=30, seed=0, image_size=16)
    return str(root / "shards")


@pytest.fixture(scope="module")
def serial(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    summary = make_buffers(shards, out, CONFIG, LocalExecutor(1, 1), device="cpu")
    return out, summary


def test_layout_and_weights_only_loading(serial):
    out, summary = serial
    assert summary["done"] == ["expert_000", "expert_001"] and not summary["failed"]
    assert sorted(p.name for p in out.glob("expert_*.pt")) == ["expert_000.pt", "expert_001.pt"]
    manifest = json.loads((out / "buffers.json").read_text())
    assert manifest["image_encoder"] == "convnet-w8-d2" and manifest["epochs"] == 2
    student = build_student("convnet-w8-d2", 64, 16, seed=0)
    n_img, n_txt = student.image_layout.size, student.text_layout.size
    for i in range(2):
        data = torch.load(expert_path(out, i), weights_only=True)
        assert set(data) == {"image", "text", "meta"}
        assert data["image"].shape == (3, n_img) and data["image"].dtype == torch.float32
        assert data["text"].shape == (3, n_txt)
        meta = data["meta"]
        assert meta["expert"] == i and meta["lr"] == 0.1 and meta["batch_size"] == 16
        assert meta["pairs"] == 60 and meta["n_img"] == n_img
        # snapshot 0 is the expert's fresh initialisation; later ones moved away from it
        fresh = build_student("convnet-w8-d2", 64, 16, derive_seed(3, i))
        p_img, p_txt = fresh.flat()
        assert torch.equal(data["image"][0], p_img) and torch.equal(data["text"][0], p_txt)
        assert not torch.equal(data["image"][1], data["image"][0])
        assert not torch.equal(data["image"][2], data["image"][1])
    a, b = (torch.load(expert_path(out, i), weights_only=True) for i in range(2))
    assert not torch.equal(a["image"][0], b["image"][0])


def test_parallel_experts_equal_serial(serial, shards, tmp_path):
    out, _ = serial
    summary = make_buffers(
        shards, tmp_path, CONFIG, LocalExecutor(workers=2, threads=1), device="cpu"
    )
    assert summary["done"] == ["expert_000", "expert_001"] and not summary["failed"]
    for i in range(2):
        one = torch.load(expert_path(out, i), weights_only=True)
        two = torch.load(expert_path(tmp_path, i), weights_only=True)
        assert torch.equal(one["image"], two["image"])
        assert torch.equal(one["text"], two["text"])


def test_second_run_skips_and_a_corrupt_file_is_redone(shards, tmp_path):
    first = make_buffers(shards, tmp_path, CONFIG, LocalExecutor(1, 1), device="cpu")
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("expert_*.pt")}
    again = make_buffers(shards, tmp_path, CONFIG, LocalExecutor(1, 1), device="cpu")
    assert again["done"] == [] and again["already_done"] == first["done"]
    assert stamps == {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("expert_*.pt")}

    good = torch.load(expert_path(tmp_path, 1), weights_only=True)
    expert_path(tmp_path, 1).write_bytes(b"not a torch file")
    with pytest.raises(UsageError, match="corrupt buffer file .*expert_001.pt") as err:
        load_buffers(tmp_path)
    assert "\n" not in str(err.value)
    redo = make_buffers(shards, tmp_path, CONFIG, LocalExecutor(1, 1), device="cpu")
    assert redo["done"] == ["expert_001"] and redo["already_done"] == ["expert_000"]
    again = torch.load(expert_path(tmp_path, 1), weights_only=True)
    assert torch.equal(again["image"], good["image"])

    three = replace(CONFIG, experts=3)
    more = make_buffers(shards, tmp_path, three, LocalExecutor(1, 1), device="cpu")
    assert more["done"] == ["expert_002"]
    assert len(load_buffers(tmp_path).experts) == 3


def test_architecture_mismatch_is_refused(serial, shards):
    out, _ = serial
    with pytest.raises(UsageError, match="made for image encoder 'convnet-w8-d2', not 'mmc-tiny'"):
        load_buffers(out, {"image_encoder": "mmc-tiny"})
    with pytest.raises(UsageError, match="image_encoder='convnet-w8-d2'"):
        make_buffers(shards, out, replace(CONFIG, image_encoder="mmc-tiny"), LocalExecutor(1, 1))
    with pytest.raises(UsageError, match="no expert buffers"):
        load_buffers(out / "nowhere")


def test_truncated_buffer_file_is_refused(serial, tmp_path):
    out, _ = serial
    data = expert_path(out, 0).read_bytes()
    (tmp_path / "expert_000.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="corrupt buffer file"):
        load_buffers(tmp_path)


def test_protocol_is_recorded_and_checked(serial, shards, tmp_path):
    out, _ = serial
    manifest = json.loads((out / "buffers.json").read_text())
    assert (manifest["augment"], manifest["normalize"], manifest["resize"]) == (
        True,
        "clip",
        "squash",
    )
    with pytest.raises(UsageError, match="made with augment=True, not False"):
        make_buffers(shards, out, replace(CONFIG, augment=False), LocalExecutor(1, 1))
    with pytest.raises(UsageError, match="normalize='clip', not 'imagenet'"):
        make_buffers(shards, out, replace(CONFIG, normalize="imagenet"), LocalExecutor(1, 1))
    with pytest.raises(UsageError, match="made for image normalisation 'clip', not 'imagenet'"):
        load_buffers(out, {"normalize": "imagenet"})
    with pytest.raises(UsageError, match="--batch-size 64 exceeds the 60 real pairs"):
        make_buffers(shards, tmp_path / "big", replace(CONFIG, batch_size=64), LocalExecutor(1, 1))
    with pytest.raises(UsageError, match="unknown normalisation 'nope'"):
        replace(CONFIG, normalize="nope").check()


def test_format_1_buffers_load_with_the_protocol_they_were_made_with(serial, tmp_path):
    """Buffers written before the protocol was recorded used ImageNet mean/std, no augmentation
    and the shorter-side crop."""
    out, _ = serial
    data = torch.load(expert_path(out, 0), weights_only=True)
    meta = {k: v for k, v in data["meta"].items() if k not in ("augment", "normalize", "resize")}
    meta.pop("protocol")
    meta["version"] = 1
    torch.save({**data, "meta": meta}, tmp_path / "expert_000.pt")
    old = load_buffers(tmp_path)
    assert (old.meta["augment"], old.meta["normalize"], old.meta["resize"]) == (
        False,
        "imagenet",
        "crop",
    )
