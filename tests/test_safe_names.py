"""Unsafe member names: the reader flags them, reshard skips and counts them, the shard writer
refuses them, and every tar reshard writes unpacks under tarfile's `data` filter."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mmcurate.cli.main import cli
from mmcurate.curate.reshard import ReshardConfig, reshard
from mmcurate.data.atomic import save_npy_atomic
from mmcurate.data.shard_writer import UnsafeNameError, shard_writer
from mmcurate.data.shards import iter_samples
from mmcurate.data.uid import uid_pairs
from mmcurate.demo.corpus import encode_image, make_pairs
from mmcurate.engine import LocalExecutor

TINY = "open_clip:mmc-tiny"
GOOD = ["000000", "000001", "part1/00002", "x.y/00003"]
# Key -> what the reader must flag. Each one is a regular image plus a caption.
UNSAFE = {
    "../../evil_00001": "unsafe_name",
    "/abs/evil_00002": "unsafe_name",
    "a/../../evil_00003": "unsafe_name",
    "./dot_00004": "unsafe_name",
    "dir//double_00005": "unsafe_name",
    "back\\slash_00006": "unsafe_name",
    "new\nline_00007": "unsafe_name",
    "tab\tkey_00008": "unsafe_name",
}
SYMLINKS = ["link_00009", "hard_00010"]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def hostile_shard(path: Path) -> Path:
    """Good samples between unsafe ones, a symlink and a hard link standing in for images;
    every sample has a caption (PAX format, so any name is stored as given)."""
    pairs = make_pairs(len(GOOD) + len(UNSAFE), seed=3, image_size=16)
    images = [encode_image(img, "jpeg") for img in pairs["images"]]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        unsafe = list(UNSAFE)
        for i, key in enumerate(GOOD):
            _add(tar, f"{key}.jpg", images[i])
            _add(tar, f"{key}.txt", f"good caption {i}".encode())
            if i < len(unsafe) // 2:
                for bad in unsafe[2 * i : 2 * i + 2]:
                    _add(tar, f"{bad}.jpg", images[len(GOOD) + unsafe.index(bad)])
                    _add(tar, f"{bad}.txt", f"caption of {bad!r}".encode())
        for key, kind in zip(SYMLINKS, (tarfile.SYMTYPE, tarfile.LNKTYPE)):
            link = tarfile.TarInfo(f"{key}.jpg")
            link.type = kind
            link.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else "000000.jpg"
            tar.addfile(link)
            _add(tar, f"{key}.txt", b"caption of a link")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def test_the_reader_flags_unsafe_names_and_link_members(tmp_path):
    samples = list(iter_samples(str(hostile_shard(tmp_path / "h.tar"))))
    by_key = {s["key"]: s for s in samples}
    assert sorted(by_key) == sorted([*GOOD, *UNSAFE, *SYMLINKS])
    for key in GOOD:
        assert by_key[key]["problem"] is None and by_key[key]["image"], key
    for key, problem in UNSAFE.items():
        assert by_key[key]["problem"] == problem, key
        assert by_key[key]["caption"] == f"caption of {key!r}"
    for key in SYMLINKS:
        sample = by_key[key]
        assert sample["links"] == ("jpg",) and sample["image"] is None
        assert set(sample["files"]) == {"txt"}
        assert sample["caption"] == "caption of a link"


def test_reshard_skips_and_counts_unsafe_samples_and_its_tars_pass_the_data_filter(tmp_path):
    shard = hostile_shard(tmp_path / "src" / "h.tar")
    samples = list(iter_samples(str(shard)))
    subset = tmp_path / "subset.npy"
    save_npy_atomic(subset, np.sort(uid_pairs([s["uid"] for s in samples])))
    out = tmp_path / "out"
    summary = reshard([str(shard)], subset, out, ReshardConfig(3), LocalExecutor(1, 1))
    assert summary["read"] == len(samples)
    assert summary["skipped"] == {"missing_image": len(SYMLINKS), "unsafe_name": len(UNSAFE)}
    assert summary["written"] == len(GOOD) and summary["not_selected"] == 0
    assert summary["not_found"] == len(UNSAFE) + len(SYMLINKS)
    names = []
    for tar_path in sorted(out.glob("*.tar")):
        dest = tmp_path / "unpacked" / tar_path.stem
        dest.mkdir(parents=True)
        with tarfile.open(tar_path) as tar:
            names += tar.getnames()
            tar.extractall(dest, filter="data")  # raises on any name leaving dest
    assert sorted(names) == sorted(f"{k}.{e}" for k in GOOD for e in ("jpg", "txt"))
    assert len(list((tmp_path / "unpacked").rglob("*.txt"))) == len(GOOD)
    assert not list(tmp_path.rglob("evil_*")), "an unsafe name reached the file system"


@pytest.mark.parametrize(
    "key",
    ["../x", "/abs/x", "a/../../x", "./x", "a//x", "a\\x", "a\nx", "a\x00x", "a.b", "", "x/"],
)
def test_the_shard_writer_refuses_unsafe_member_names(tmp_path, key):
    path = tmp_path / "out.tar"
    with pytest.raises(UnsafeNameError):
        with shard_writer(path) as write:
            write("fine", {"txt": b"ok"})
            write(key, {"txt": b"bad"})
    assert not path.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ext", ["", "a/b", "t\nxt", "t\x00xt"])
def test_the_shard_writer_refuses_unsafe_extensions(tmp_path, ext):
    with pytest.raises(UnsafeNameError):
        with shard_writer(tmp_path / "out.tar") as write:
            write("fine", {ext: b"bad"})
    assert list(tmp_path.iterdir()) == []


def test_the_shard_writer_accepts_sub_directories(tmp_path):
    with shard_writer(tmp_path / "out.tar") as write:
        write("part1/00001", {"txt": b"a", "seg.png": b"b"})
    with tarfile.open(tmp_path / "out.tar") as tar:
        assert tar.getnames() == ["part1/00001.seg.png", "part1/00001.txt"]


def test_embed_skips_and_counts_unsafe_names(tmp_path):
    shard = hostile_shard(tmp_path / "src" / "h.tar")
    out = tmp_path / "store"
    args = ["embed", str(shard), "--out", str(out), "--model", TINY, "--decode-workers", "0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    done = json.loads((out / "h.done.json").read_text())
    assert done["skipped"] == {"missing_image": 2, "unsafe_name": len(UNSAFE)}
    assert done["rows"] == len(GOOD)
