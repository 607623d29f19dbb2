"""The buffer -> distill -> evaluate commands end to end, resume, export, and bad input."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mmcurate.cli.main import cli
from mmcurate.demo.corpus import generate_corpus
from mmcurate.distill.buffers import load_buffers
from mmcurate.distill.data import load_pairs
from mmcurate.distill.evaluate import EvalConfig, artifact_set, evaluate_small_set, mtt_artifact
from mmcurate.distill.presets import PRESETS

TEXT = "hf-text:mmc-tiny-bert"
FAST = ["--preset", "tiny", "--pairs", "6", "--mini-batch", "3", "--syn-steps", "3"]
FAST += ["--lr-lr", "1e-6", "--device", "cpu"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    generate_corpus(root / "train", n_shards=2, per_shard=30, seed=0, image_size=16)
    generate_corpus(root / "test", n_shards=1, per_shard=20, seed=5, image_size=16)
    result = CliRunner().invoke(
        cli,
        ["buffer", str(root / "train"), "--out", str(root / "buf"), "--experts", "2"]
        + ["--epochs", "3"]
        + ["--batch-size", "16", "--image-encoder", "convnet-w8-d2", "--text-encoder", TEXT]
        + ["--image-size", "16", "--device", "cpu", "--json", str(root / "buf.json")],
    )
    assert result.exit_code == 0, result.output
    assert "buffer (experts): 2 done, 0 already done (skipped), 0 failed" in result.output
    assert json.loads((root / "buf.json").read_text())["done"] == ["expert_000", "expert_001"]
    return root


def _load(art):
    cfg = art["config"]
    return {
        "image_size": cfg["image_size"],
        "text_encoder": cfg["text_encoder"],
        "cache_dir": cfg["buffers"] + "/cache",
        "resize": cfg["resize"],
    }


def _distill(root, out, *extra):
    args = [str(root / "train"), "--buffers", str(root / "buf"), "--out", str(out), *FAST]
    return CliRunner().invoke(cli, ["distill", *args, *extra])


def test_artifact_format_export_and_evaluate(root):
    out = root / "syn.pt"
    export = ["--export", str(root / "ex")]
    result = _distill(root, out, "--iterations", "4", "--save-every", "2", *export)
    assert result.exit_code == 0, result.output
    assert "distill: 6 pairs from 60 real (tiny preset, 4 iterations" in result.output
    art = torch.load(out, weights_only=True)
    spec_keys = {"images", "texts", "similarity", "lr_img", "lr_txt", "config", "provenance"}
    assert set(art) == spec_keys
    assert art["images"].shape == (6, 3, 16, 16) and art["images"].dtype == torch.float32
    assert art["texts"].shape == (6, 64) and art["texts"].dtype == torch.float32
    sim = art["similarity"]
    assert set(sim) == {"a", "L", "R", "alpha", "rank"}
    assert sim["a"].shape == (6,) and sim["L"].shape == (6, 4) and sim["R"].shape == (6, 4)
    assert isinstance(sim["alpha"], float) and sim["rank"] == 4
    assert isinstance(art["lr_img"], float) and isinstance(art["lr_txt"], float)
    assert art["config"]["preset"] == "tiny" and art["config"]["iterations"] == 4
    assert art["config"]["image_encoder"] == "convnet-w8-d2"
    uids = art["provenance"]["uids"]
    assert len(set(uids)) == 6 and all(re.fullmatch(r"[0-9a-f]{32}", u) for u in uids)
    assert (root / "syn.ckpt.pt").is_file()

    grid = Image.open(root / "ex" / "images.png")
    assert grid.size == (6 * 18 + 2, 18 + 2)
    assert Image.open(root / "ex" / "images" / "005.png").size == (16, 16)
    captions = json.loads((root / "ex" / "captions.json").read_text())
    assert [c["init_uid"] for c in captions] == uids
    train = load_pairs(str(root / "train"), **_load(art))
    for c, text in zip(captions, art["texts"], strict=True):
        row = train.captions.index(c["caption"])
        cosine = torch.nn.functional.cosine_similarity(text, train.texts[row], dim=0)
        assert c["cosine"] == pytest.approx(float(cosine), abs=1e-4)

    common = ["--test", str(root / "test"), "--num-eval", "2", "--epochs", "3", "--device", "cpu"]
    test = load_pairs(str(root / "test"), **_load(art))
    for extra in ([], ["--baseline", "random"], ["--baseline", "mtt"], ["--protocol", "paper"]):
        js = root / f"eval{len(extra)}{extra[-1] if extra else ''}.json"
        result = CliRunner().invoke(cli, ["evaluate", str(out), *common, *extra, "--json", str(js)])
        assert result.exit_code == 0, result.output
        assert "mean R@K" in result.output and "20 test images / 20 captions" in result.output
        summary = json.loads(js.read_text())
        keys = {"IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10"}
        assert set(summary) == (keys | {"best_on_test"} if "paper" in extra else keys)
        if extra in ([], ["--protocol", "paper"]):
            protocol = extra[-1] if extra else "last"
            cfg = EvalConfig(num_eval=2, epochs=3, protocol=protocol)
            expected = evaluate_small_set(artifact_set(art), test, cfg, progress=False)
            for k in keys:
                assert summary[k] == pytest.approx(expected["summary"][k]), k
    paper = json.loads((root / "eval2paper.json").read_text())
    assert "SELECTED ON THE TEST DATA" in result.output
    best = paper["best_on_test"]
    assert set(best) == keys and all(set(v) == {"mean", "std"} for v in best.values())
    assert np.mean([best[k]["mean"] for k in keys]) >= np.mean([paper[k]["mean"] for k in keys])
    mtt = torch.load(root / "syn.mtt6.pt", weights_only=True)
    assert mtt["config"]["method"] == "mtt" and mtt["config"]["loss"] == "ce"
    assert torch.equal(mtt["similarity"]["a"], torch.ones(6))
    assert torch.equal(mtt["similarity"]["R"], torch.zeros(6, 4))
    direct = mtt_artifact(art, train, load_buffers(root / "buf"), progress=False)
    for key in ("images", "texts"):
        assert torch.allclose(mtt[key], direct[key], atol=1e-5), key


def test_resume_continues_exactly(root, tmp_path):
    straight = _distill(root, tmp_path / "a.pt", "--iterations", "6", "--save-every", "0")
    assert straight.exit_code == 0, straight.output
    first = _distill(root, tmp_path / "b.pt", "--iterations", "3", "--save-every", "3")
    assert first.exit_code == 0, first.output
    resumed = _distill(root, tmp_path / "b.pt", "--iterations", "6", "--resume")
    assert resumed.exit_code == 0, resumed.output
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    for key in ("images", "texts"):
        assert torch.equal(a[key], b[key]), key
    for key in ("a", "L", "R"):
        assert torch.equal(a["similarity"][key], b["similarity"][key]), key
    assert a["lr_img"] == b["lr_img"] and a["lr_txt"] == b["lr_txt"]
    changed = _distill(root, tmp_path / "b.pt", "--iterations", "8", "--resume", "--lr-img", "5")
    made_with = f"was made with lr_img={PRESETS['tiny']['lr_img']}, not 5.0"
    assert changed.exit_code == 2 and made_with in changed.output


def test_full_matching_and_full_similarity_matrix(root, tmp_path):
    out = tmp_path / "full.pt"
    args = ["--iterations", "2", "--matching", "full", "--rank", "full", "--merge-loss-branches"]
    result = _distill(root, out, *args)
    assert result.exit_code == 0, result.output
    art = torch.load(out, weights_only=True)
    assert art["config"]["merge_loss_branches"] is True
    sim = art["similarity"]
    assert art["config"]["matching"] == "full" and art["config"]["rank"] == "full"
    assert sim["rank"] == 6 and sim["alpha"] == 6.0 and torch.equal(sim["R"], torch.eye(6))
    assert torch.equal(sim["a"], torch.zeros(6)) and not torch.equal(sim["L"], torch.eye(6))
    bad = _distill(root, out, "--rank", "zero")
    _one_line_error(bad, "--rank must be a positive integer or 'full'")


def _one_line_error(result, text):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and text in errors[0], result.output


def test_bad_input_gets_one_line(root, tmp_path):
    _one_line_error(_distill(root, tmp_path / "x.pt", "--preset", "huge"), "unknown preset 'huge'")
    _one_line_error(
        _distill(root, tmp_path / "x.pt", "--image-encoder", "mmc-tiny"),
        "were made for image encoder 'convnet-w8-d2', not 'mmc-tiny'",
    )
    _one_line_error(
        _distill(root, tmp_path / "x.pt", "--pairs", "500"),
        "60 images (60 pairs), fewer than N = 500",
    )
    bad = tmp_path / "buf"
    shutil.copytree(root / "buf", bad)
    (bad / "expert_001.pt").write_bytes(b"\x00garbage")
    args = [str(root / "train"), "--buffers", str(bad), "--out", str(tmp_path / "x.pt"), *FAST]
    _one_line_error(CliRunner().invoke(cli, ["distill", *args]), "corrupt buffer file")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    _one_line_error(
        CliRunner().invoke(
            cli, ["evaluate", str(tmp_path / "junk.pt"), "--test", str(root / "test")]
        ),
        "corrupt distilled file",
    )
    _one_line_error(
        _distill(root, tmp_path / "x.pt", "--max-start-epoch", "5"),
        "exceeds the 3 epochs of the buffers",
    )
    _one_line_error(
        _distill(root, tmp_path / "x.pt", "--max-start-epoch", "0"),
        "--max-start-epoch must be >= 1",
    )
    _one_line_error(
        _distill(root, tmp_path / "x.pt", "--temperature", "0"), "--temperature must be > 0"
    )
    assert not (tmp_path / "x.pt").exists()


def test_buffers_of_another_normalisation_are_refused(root, tmp_path):
    """Buffers trained on ImageNet-normalised images, distilled on CLIP-normalised data."""
    made = CliRunner().invoke(
        cli,
        ["buffer", str(root / "train"), "--out", str(tmp_path / "inet"), "--experts", "1"]
        + ["--epochs", "2", "--batch-size", "16", "--image-encoder", "convnet-w8-d2"]
        + ["--text-encoder", TEXT, "--image-size", "16", "--device", "cpu"]
        + ["--normalize", "imagenet", "--no-augment"],
    )
    assert made.exit_code == 0, made.output
    assert "imagenet mean/std, squash resize, full batches only" in made.output
    args = [
        str(root / "train"),
        "--buffers",
        str(tmp_path / "inet"),
        "--out",
        str(tmp_path / "x.pt"),
    ]
    result = CliRunner().invoke(cli, ["distill", *args, *FAST, "--normalize", "clip"])
    _one_line_error(result, "were made for image normalisation 'imagenet', not 'clip'")
    result = CliRunner().invoke(cli, ["distill", *args, *FAST, "--resize", "crop"])
    _one_line_error(result, "were made for resize mode 'squash', not 'crop'")
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("eta_param", ["linear", "log"])
def test_a_learned_step_size_at_zero_stops_with_the_remedy(root, tmp_path, eta_param):
    """Linear η goes negative, log η underflows to 0; only the first is told to try log."""
    out = tmp_path / "eta.pt"
    result = _distill(
        root, out, "--iterations", "50", "--lr-lr", "1e4", "--save-every", "0",
        "--eta-param", eta_param,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert re.search(r"learned step size lr_(img|txt) became -?\d", errors[0]), errors[0]
    assert "lower --lr-lr (now 10000)" in errors[0]
    assert ("--eta-param log" in errors[0]) == (eta_param == "linear"), errors[0]
    assert not out.exists()


def test_log_step_sizes_run_where_linear_ones_stop_at_iteration_0(root, tmp_path):
    """flickr-100's rates on tiny students: the linear η goes negative at once; learned in log
    space η stays positive (with the X, Y, S rates warmed up, the run finishes)."""
    args = [str(root / "train"), "--buffers", str(root / "buf"), "--preset", "flickr-100"]
    args += ["--pairs", "20", "--iterations", "30", "--save-every", "0", "--device", "cpu"]
    linear = CliRunner().invoke(cli, ["distill", *args, "--out", str(tmp_path / "a.pt")])
    assert linear.exit_code == 1 and "at iteration 0" in linear.output, linear.output
    logged = CliRunner().invoke(
        cli,
        ["distill", *args, "--out", str(tmp_path / "b.pt"), "--eta-param", "log"]
        + ["--warmup", "300"],
    )
    assert logged.exit_code == 0, logged.output
    art = torch.load(tmp_path / "b.pt", weights_only=True)
    assert art["config"]["eta_param"] == "log" and art["lr_img"] > 0 and art["lr_txt"] > 0
    ckpt = torch.load(tmp_path / "b.ckpt.pt", weights_only=True)
    assert float(ckpt["eta_img"].exp()) == pytest.approx(art["lr_img"], rel=1e-6)
