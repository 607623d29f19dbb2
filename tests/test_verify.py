"""Silent corruption is found, not propagated: files damaged after their markers were written
(truncated, one bit flipped, deleted) are named by `mmcurate verify` (exit 1), refused by
readers when resized, and redone by a re-run of the stage, byte-identical to the original."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from faults.figures import FIGURES, tally_markers, tally_reshard
from test_kill_resume import _snapshot

from mmcurate.cli.main import cli
from mmcurate.demo.corpus import generate_corpus

TINY = "open_clip:mmc-tiny"
TEXT = "hf-text:mmc-tiny-bert"


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A demo-like run over a tiny corpus: store, scores, subset, reshard output, buffers."""
    root = tmp_path_factory.mktemp("verify")
    shards = generate_corpus(root / "src", n_shards=3, per_shard=24, seed=3, image_size=16)
    steps = [
        ["embed", *shards, "--out", root / "store", "--model", TINY, "--decode-workers", "0"],
        ["score", root / "store", "--out", root / "scores", "--metric", "clipscore"],
        ["select", root / "scores", "--out", root / "subset.npy", "--keep", "clipscore:0.5"],
        ["reshard", *shards, "--subset", root / "subset.npy", "--out", root / "subset"],
        ["buffer", root / "src", "--out", root / "buf", "--experts", "2", "--epochs", "2"]
        + ["--batch-size", "16", "--image-encoder", "convnet-w8-d2", "--text-encoder", TEXT]
        + ["--image-size", "16", "--device", "cpu"],
    ]
    for step in steps:
        result = invoke(*step)
        assert result.exit_code == 0, (step[0], result.output)
    return root


OUTPUTS = ("store", "scores", "subset", "buf")


@pytest.mark.parametrize("name", OUTPUTS)
def test_verify_passes_on_demo_outputs(demo, name):
    result = invoke("verify", demo / name)
    assert result.exit_code == 0, result.output
    assert "all good" in result.output


def _flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def test_one_flipped_byte_in_one_npz_is_named(demo, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(demo / "store", store)
    victim = sorted(store.glob("*.npz"))[1]
    _flip(victim)
    result = invoke("verify", store)
    assert result.exit_code == 1, result.output
    bad = [x for x in result.output.splitlines() if "checksum" in x]
    assert bad == [f"{victim}: checksum differs from its marker"], result.output
    assert "1 bad file(s)" in result.output


DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:-7]),
    "bit-flipped": _flip,
    "deleted": lambda p: p.unlink(),
}
SAMPLES = 72  # 3 shards of 24
# (output, stage to re-run, the file damaged in it)
TARGETS = {
    "store npz": ("store", "embed", "*.npz"),
    "score sidecar": ("scores", "score", "*.scores.parquet"),
    "reshard tar": ("subset", "reshard", "*.tar"),
    "buffer expert": ("buf", "buffer", "expert_001.pt"),
}


def _rerun(demo: Path, stage: str, out: Path):
    shards = sorted(str(p) for p in (demo / "src").glob("*.tar"))
    args = {
        "embed": ["embed", *shards, "--out", out, "--model", TINY, "--decode-workers", "0"],
        "score": ["score", demo / "store", "--out", out, "--metric", "clipscore"],
        "reshard": ["reshard", *shards, "--subset", demo / "subset.npy", "--out", out],
        "buffer": ["buffer", demo / "src", "--out", out, "--experts", "2", "--epochs", "2"]
        + ["--batch-size", "16", "--image-encoder", "convnet-w8-d2", "--text-encoder", TEXT]
        + ["--image-size", "16", "--device", "cpu"],
    }[stage]
    return invoke(*args)


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("target", list(TARGETS))
def test_damaged_file_found_and_redone(demo, tmp_path, target, damage):
    name, stage, pattern = TARGETS[target]
    out = tmp_path / name
    shutil.copytree(demo / name, out)
    reference = _tree(out)
    victim = sorted(out.glob(pattern))[-1]
    DAMAGE[damage](victim)
    found = invoke("verify", out)
    named = found.exit_code == 1 and str(victim) in found.output
    fixed = invoke("verify", out, "--invalidate")
    rerun = _rerun(demo, stage, out)
    after = invoke("verify", out)
    identical = _tree(out) == reference
    survived = named and rerun.exit_code == 0 and after.exit_code == 0 and identical
    if stage == "reshard":
        tally = tally_reshard(SAMPLES, out / "reshard.json")
    elif stage == "buffer":  # experts hold no samples: nothing to lose or count
        tally = tally_markers(0, [])
    else:
        tally = tally_markers(SAMPLES, sorted(out.glob("*.done.json")))
    FIGURES.record_fault(f"corrupted file: {damage}", survived, tally)
    assert named, found.output
    assert fixed.exit_code == 1
    assert rerun.exit_code == 0, rerun.output
    assert after.exit_code == 0, after.output
    assert identical, sorted(set(_tree(out)) ^ set(reference))


def _tree(root: Path) -> dict:
    """Every final-named file under root (recursively), JSON without `seconds`."""
    snap = {}
    for sub in sorted({p.parent for p in root.rglob("*") if p.is_file()}):
        for key, value in _snapshot(sub).items():
            snap[str((sub / key).relative_to(root))] = value
    return snap


def test_reader_refuses_a_resized_store_file(demo, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(demo / "store", store)
    victim = sorted(store.glob("*.npz"))[0]
    victim.write_bytes(victim.read_bytes() + b"\0")
    result = invoke("score", store, "--out", tmp_path / "s", "--metric", "clipscore")
    assert result.exit_code == 1
    lines = [x for x in result.output.splitlines() if str(victim) in x]
    assert lines and "its marker says" in lines[0], result.output
    assert "Traceback" not in result.output
