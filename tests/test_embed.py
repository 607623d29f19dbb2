"""`mmcurate embed` end to end: rows, float16 unit norm, resume, bad input, worker independence."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
from click.testing import CliRunner
from conftest import TINY_CLIP, embed_args, run_cli

import mmcurate.data.shards as shards
from mmcurate.cli.main import cli
from mmcurate.data.shard_writer import write_shard
from mmcurate.data.shards import ShardItem
from mmcurate.demo.corpus import make_pairs, pair_files
from mmcurate.embed.stage import EmbedConfig, embed_shard


def _embed(src, out, *extra):
    return CliRunner().invoke(cli, embed_args(src, out, *extra))


def _files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.endswith(".json")}


def test_embed_writes_unit_float16_rows_and_resumes(corpus3, tmp_path):
    out = tmp_path / "store"
    result = _embed(corpus3, out)
    assert result.exit_code == 0, result.output
    for shard in corpus3:
        stem = shard.stem
        meta = pq.read_table(out / f"{stem}.parquet")
        assert meta.num_rows == 40
        assert meta.column_names == ["uid", "key", "caption", "url", "shard"]
        with np.load(out / f"{stem}.npz", allow_pickle=False) as npz:
            for key in ("img", "txt"):
                assert npz[key].dtype == np.float16 and npz[key].shape == (40, 32)
                norms = np.linalg.norm(npz[key].astype(np.float64), axis=1)
                np.testing.assert_allclose(norms, 1.0, atol=2e-3)
        done = json.loads((out / f"{stem}.done.json").read_text())
        assert done["rows"] == 40 and done["read"] == 40 and done["skipped"] == {}
    before = _files(out)
    markers = {p.name: p.stat().st_mtime_ns for p in out.glob("*.done.json")}

    again = _embed(corpus3, out)
    assert again.exit_code == 0
    assert "0 done, 3 already done" in again.output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.done.json")} == markers

    (out / "00001.done.json").unlink()
    (out / "00001.npz").write_bytes(b"partial garbage")
    redo = _embed(corpus3, out)
    assert redo.exit_code == 0 and "1 done, 2 already done" in redo.output
    assert _files(out) == before
    assert (out / "00000.done.json").stat().st_mtime_ns == markers["00000.done.json"]


def test_results_do_not_depend_on_workers(corpus3, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert _embed(corpus3, one, "--threads", "1").exit_code == 0
    result = _embed(corpus3, two, "--workers", "2", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert _files(one) == _files(two)


def test_decode_workers_give_the_same_bytes(corpus3, tmp_path):
    inline, workers = tmp_path / "inline", tmp_path / "workers"
    assert _embed(corpus3[:1], inline).exit_code == 0
    result = CliRunner().invoke(
        cli,
        [
            "embed",
            str(corpus3[0]),
            "--out",
            str(workers),
            "--model",
            TINY_CLIP,
            "--batch-size",
            "16",
            "--decode-workers",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert _files(inline) == _files(workers)


def _bad_corpus(root):
    pairs = make_pairs(30, seed=5)
    samples = []
    for i in range(30):
        files = pair_files(pairs["images"][i], pairs["captions"][i], {"i": i})
        if i == 3:
            files["jpg"] = files["jpg"][: len(files["jpg"]) // 2]
        if i == 7:
            del files["txt"]
        if i == 9:
            files["txt"] = b"   "
        samples.append((f"{i:06d}", files))
    write_shard(root / "good-a.tar", samples[:20])
    write_shard(root / "flawed.tar", samples[:20])
    good = (root / "good-a.tar").read_bytes()
    (root / "corrupt.tar").write_bytes(good[: len(good) // 2])
    write_shard(root / "good-b.tar", samples[20:])
    return sorted(root.glob("*.tar"))


def test_bad_input_is_counted_and_reported_without_traceback(tmp_path):
    src = tmp_path / "src"
    shards = _bad_corpus(src)
    out = tmp_path / "store"
    proc = run_cli("embed", *shards, "--out", out, "--model", TINY_CLIP, "--decode-workers", "0")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "corrupt: truncated tar" in proc.stdout or "corrupt: corrupt tar" in proc.stdout
    assert not (out / "corrupt.done.json").exists()
    assert not (out / "corrupt.parquet").exists()
    flawed = json.loads((out / "flawed.done.json").read_text())
    assert flawed["skipped"] == {"missing_caption": 2, "undecodable_image": 1}
    assert flawed["read"] == 20 and flawed["rows"] == 17
    assert pq.read_table(out / "flawed.parquet").num_rows == 17
    for stem, rows in (("good-a", 17), ("good-b", 10)):
        assert json.loads((out / f"{stem}.done.json").read_text())["rows"] == rows


def test_duplicate_uid_within_a_shard_is_skipped(tmp_path):
    pairs = make_pairs(4, seed=2)
    samples = [
        (f"k{i}", pair_files(pairs["images"][i], pairs["captions"][i], {})) for i in range(3)
    ]
    dup_meta = {"uid": "0123456789abcdef0123456789abcdef"}
    samples += [
        ("a", pair_files(pairs["images"][3], "x", dup_meta)),
        ("b", pair_files(pairs["images"][3], "y", dup_meta)),
    ]
    shard = write_shard(tmp_path / "dups.tar", samples)
    out = tmp_path / "store"
    assert _embed([shard], out).exit_code == 0
    done = json.loads((out / "dups.done.json").read_text())
    assert done["skipped"] == {"duplicate_uid": 1} and done["rows"] == 4


def test_image_modality_embeds_a_folder_of_images(tmp_path):
    from PIL import Image

    pairs = make_pairs(5, seed=3)
    folder = tmp_path / "target"
    (folder / "sub").mkdir(parents=True)
    for i, img in enumerate(pairs["images"]):
        Image.fromarray(img).save(folder / ("sub" if i % 2 else ".") / f"im{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "store"
    result = _embed([folder], out, "--modality", "image")
    assert result.exit_code == 0, result.output
    meta = pq.read_table(out / "target.parquet")
    assert sorted(meta["key"].to_pylist()) == sorted(
        ["im0.png", "sub/im1.png", "im2.png", "sub/im3.png", "im4.png"]
    )
    with np.load(out / "target.npz", allow_pickle=False) as npz:
        assert set(npz.files) == {"img"} and npz["img"].shape == (5, 32)


def test_bad_spec_is_refused_in_one_line(corpus3, tmp_path):
    proc = run_cli("embed", corpus3[0], "--out", tmp_path / "s", "--model", "clip:nothing")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad encoder spec 'clip:nothing'" in lines[0]
    assert not (tmp_path / "s").exists()


def test_duplicate_stems_are_refused(corpus3, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / corpus3[0].name).write_bytes(corpus3[0].read_bytes())
    result = _embed([corpus3[0], other / corpus3[0].name], tmp_path / "s")
    assert result.exit_code == 2 and "same stem" in result.output


def test_tar_members_are_read_not_extracted(tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        for name, data in (("../../escape.txt", b"caption"), ("../../escape.jpg", b"\xff\xd8")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    _embed([evil], tmp_path / "s")
    assert not (tmp_path.parent / "escape.txt").exists()
    assert not (tmp_path / "escape.txt").exists()


class CountingFile(io.FileIO):
    """A shard file that appends "pid bytes-read" to a log when closed, from any process."""

    def __init__(self, path: str, log: str) -> None:
        super().__init__(path, "rb")
        self.log, self.count = log, 0

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        self.count += len(data)
        return data

    def readinto(self, buffer) -> int:
        n = super().readinto(buffer) or 0
        self.count += n
        return n

    def close(self) -> None:
        if not self.closed:
            with open(self.log, "a") as fh:
                fh.write(f"{os.getpid()} {self.count}\n")
        super().close()


def test_each_shard_is_read_once_with_two_decode_workers(corpus3, tmp_path, monkeypatch):
    log = tmp_path / "reads.log"
    monkeypatch.setattr(shards, "_open", lambda url: CountingFile(url, str(log)))
    shard = corpus3[0]
    config = EmbedConfig(TINY_CLIP, batch_size=8, device="cpu", decode_workers=2)
    stats = embed_shard(config, str(tmp_path / "store"), ShardItem(shard.stem, str(shard)))
    assert stats["rows"] == 40
    reads = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    assert len(reads) == 1, reads
    pid, nbytes = reads[0]
    assert pid == os.getpid()
    assert nbytes <= shard.stat().st_size + 1024


def _mixed_shard(root):
    """JPEG pairs, one PNG pair (decode_jpeg cannot read it) and one truncated JPEG."""
    pairs = make_pairs(12, seed=6)
    samples = []
    for i in range(12):
        files = pair_files(pairs["images"][i], pairs["captions"][i], {}, "png" if i == 4 else "jpg")
        if i == 9:
            files["jpg"] = files["jpg"][: len(files["jpg"]) // 2]
        samples.append((f"{i:06d}", files))
    return write_shard(root / "mixed.tar", samples)


def test_device_decode_falls_back_per_image_and_matches_pil_closely(tmp_path):
    shard = _mixed_shard(tmp_path)
    outs = {}
    for decode in ("cpu", "gpu"):
        outs[decode] = tmp_path / decode
        result = _embed([shard], outs[decode], "--decode", decode, "--threads", "1")
        assert result.exit_code == 0, result.output
    done = {d: json.loads((outs[d] / "mixed.done.json").read_text()) for d in outs}
    for d in outs:
        assert done[d]["skipped"] == {"undecodable_image": 1} and done[d]["rows"] == 11
        assert done[d]["decode"] == d
    assert done["gpu"]["decode_fallbacks"] == 2
    emb = {}
    for d in outs:
        with np.load(outs[d] / "mixed.npz", allow_pickle=False) as npz:
            emb[d] = npz["img"].astype(np.float64)
    cosine = (emb["cpu"] * emb["gpu"]).sum(1)
    assert cosine.min() > 0.99, cosine
    png_row = pq.read_table(outs["gpu"] / "mixed.parquet")["key"].to_pylist().index("000004")
    np.testing.assert_array_equal(emb["gpu"][png_row], emb["cpu"][png_row])
