"""Student towers from encoder specs: open_clip checkpoints as the image backbone and the frozen
text tower, their fingerprints, distillation through a ViT, and the refusals of other towers."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import run_cli

from mmcurate.cli.main import cli
from mmcurate.demo.corpus import generate_corpus
from mmcurate.demo.teacher import build_model
from mmcurate.distill.buffers import expert_path, load_buffers
from mmcurate.distill.data import clean_caption, load_pairs
from mmcurate.embed import load_encoder
from mmcurate.embed.encoders import weights_fingerprint

FAST = ["--preset", "tiny", "--pairs", "6", "--mini-batch", "3", "--syn-steps", "2"]
FAST += ["--lr-lr", "1e-6", "--device", "cpu", "--iterations", "2", "--save-every", "0"]
FAST += ["--expert-epochs", "1"]


def _checkpoint(path, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _ = build_model()
    torch.save(model.state_dict(), path)
    return model


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    generate_corpus(root / "train", n_shards=2, per_shard=24, seed=0, image_size=32)
    generate_corpus(root / "test", n_shards=1, per_shard=16, seed=5, image_size=32)
    # two separately made checkpoints: the image tower of one, the text tower of the other
    image_model = _checkpoint(root / "image.pt", 7)
    _checkpoint(root / "text.pt", 8)
    image = f"open_clip:mmc-tiny@{root / 'image.pt'}"
    text = f"open_clip:mmc-tiny@{root / 'text.pt'}"
    result = _buffer(root, root / "buf", image, text)
    assert result.exit_code == 0, result.output
    return {"root": root, "image": image, "text": text, "image_model": image_model}


def _buffer(root, out, image, text, *extra):
    args = ["buffer", str(root / "train"), "--out", str(out), "--experts", "1", "--epochs", "2"]
    args += ["--batch-size", "16", "--image-encoder", image, "--text-encoder", text]
    return CliRunner().invoke(
        cli, [*args, "--image-size", "32", "--device", "cpu", "--no-augment", *extra]
    )


def _distill(root, out, *extra):
    args = [str(root / "train"), "--buffers", str(root / "buf"), "--out", str(out), *FAST]
    return CliRunner().invoke(cli, ["distill", *args, *extra])


def _one_line_error(result, text):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and text in errors[0], result.output


def test_experts_start_from_the_checkpoint(root):
    data = torch.load(expert_path(root["root"] / "buf", 0), weights_only=True)
    state = torch.load(root["root"] / "image.pt", weights_only=True)
    visual = root["image_model"].visual
    want = torch.cat([state[f"visual.{n}"].reshape(-1) for n, _ in visual.named_parameters()])
    assert torch.equal(data["image"][0], want)
    assert not torch.equal(data["image"][1], want)
    meta = data["meta"]
    assert meta["image_encoder"] == root["image"] and meta["text_encoder"] == root["text"]
    assert meta["image_weights"] == weights_fingerprint(visual)
    assert meta["text_weights"] == load_encoder(root["text"], "cpu").fingerprint
    assert meta["text_weights"] != meta["image_weights"] and meta["text_dim"] == 32


def test_text_features_are_the_encoders_own(root):
    pairs = load_pairs(
        str(root["root"] / "train"),
        image_size=32,
        text_encoder=root["text"],
        cache_dir=root["root"] / "buf" / "cache",
        resize="squash",
    )
    encoder = load_encoder(root["text"], "cpu")
    want = encoder.encode_texts([clean_caption(c) for c in pairs.captions], normalize=False)
    assert pairs.texts.shape == (48, 32)
    torch.testing.assert_close(pairs.texts, want, rtol=0, atol=1e-6)


def test_distill_and_evaluate_through_a_vit_tower(root):
    out = root["root"] / "vit.pt"
    result = _distill(root["root"], out)
    assert result.exit_code == 0, result.output
    art = torch.load(out, weights_only=True)
    assert art["config"]["image_encoder"] == root["image"]
    assert art["images"].shape == (6, 3, 32, 32) and torch.isfinite(art["images"]).all()
    ev = CliRunner().invoke(
        cli,
        ["evaluate", str(out), "--test", str(root["root"] / "test"), "--num-eval", "1"]
        + ["--epochs", "2", "--device", "cpu"],
    )
    assert ev.exit_code == 0, ev.output


def test_other_towers_are_refused_in_one_line(root, tmp_path):
    base = root["root"]
    out = tmp_path / "x.pt"
    _one_line_error(
        _distill(base, out, "--image-encoder", "open_clip:mmc-tiny@random"),
        f"were made for image encoder {root['image']!r}, not 'open_clip:mmc-tiny@random'",
    )
    _one_line_error(
        _distill(base, out, "--text-encoder", "hf-text:mmc-tiny-bert"),
        "text tower 'hf-text:mmc-tiny-bert' gives 64-d features; the buffers in",
    )
    _one_line_error(
        _distill(base, out, "--text-encoder", "open_clip:mmc-tiny@random"),
        "text tower 'open_clip:mmc-tiny@random' starts from random weights; the buffers in",
    )
    assert not out.exists()
    meta = load_buffers(base / "buf").meta
    assert meta["image_weights"] != "random" and meta["text_weights"] != "random"


def test_bad_checkpoints_write_nothing(root, tmp_path):
    base = root["root"]
    text = root["text"]
    missing = f"open_clip:mmc-tiny@{tmp_path / 'none.pt'}"
    _one_line_error(_buffer(base, tmp_path / "a", missing, text), "not found")
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    junk = f"open_clip:mmc-tiny@{tmp_path / 'junk.pt'}"
    _one_line_error(_buffer(base, tmp_path / "b", junk, text), "is not a safe tensor file")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    other = f"open_clip:mmc-tiny@{tmp_path / 'other.pt'}"
    _one_line_error(_buffer(base, tmp_path / "c", other, text), "does not fit open_clip mmc-tiny")
    _one_line_error(_buffer(base, tmp_path / "d", root["image"], other), "does not fit")
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_a_changed_checkpoint_is_refused(root, tmp_path):
    """The buffers' fingerprint pins the weights, not only the spec: a checkpoint overwritten
    after the buffers were made is refused by distill (in a fresh process, as a user runs it)."""
    base = root["root"]
    shutil.copy(base / "image.pt", tmp_path / "image.pt")
    image = f"open_clip:mmc-tiny@{tmp_path / 'image.pt'}"
    made = _buffer(base, tmp_path / "buf", image, root["text"])
    assert made.exit_code == 0, made.output
    shutil.copy(base / "text.pt", tmp_path / "image.pt")
    args = [str(base / "train"), "--buffers", str(tmp_path / "buf"), "--out", tmp_path / "x.pt"]
    result = run_cli("distill", *args, *FAST)
    assert result.returncode == 2, result.stderr
    assert "was made with other weights of" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x.pt").exists()


def test_a_students_start_does_not_depend_on_what_the_process_built_before(root):
    """The first student built from a checkpoint loads (and caches) its tower: that load must
    not draw from the seeded stream, or the first student of a worker would differ from the
    rest and results would depend on how items fall on workers."""
    from mmcurate.distill.students import build_student
    from mmcurate.distill.towers import _pretrained_visual

    _pretrained_visual.cache_clear()
    first, second = (build_student(root["image"], 32, 32, seed=5) for _ in range(2))
    params = dict(second.named_parameters())
    assert all(torch.equal(p, params[n]) for n, p in first.named_parameters())
