"""Shard reading, uid rules, the store (incl. DataComp layout) and atomic writes."""

from __future__ import annotations

import hashlib
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from mmcurate.data.atomic import atomic_path, save_npz_atomic, torch_save_atomic
from mmcurate.data.shard_writer import write_shard
from mmcurate.data.shards import expand_sources, iter_samples, shard_stem
from mmcurate.data.store import finished_stems, read_arrays, read_meta, read_stem, write_stem
from mmcurate.data.uid import pair_to_uid, sample_uid, uid_and_source, uid_pairs
from mmcurate.errors import ShardError, UsageError


def test_reader_agrees_with_webdataset(corpus3):
    ours = [(s["key"], s["caption"], s["image"]) for s in iter_samples(str(corpus3[0]))]
    theirs = [
        (s["__key__"], s["txt"].decode(), s["jpg"])
        for s in wds.WebDataset(str(corpus3[0]), shardshuffle=False)
    ]
    assert ours == theirs and len(ours) == 40


def test_uid_rule():
    assert sample_uid("00042", "k1", None) == hashlib.md5(b"00042/k1").hexdigest()
    given = "ABCDEF0123456789abcdef0123456789"
    assert sample_uid("s", "k", {"uid": given}) == given.lower()
    pairs = uid_pairs([given.lower()])
    assert pairs.dtype == np.dtype("u8,u8")
    assert int(pairs[0]["f0"]) == int(given[:16], 16) and int(pairs[0]["f1"]) == int(given[16:], 16)
    assert pair_to_uid(pairs[0]["f0"], pairs[0]["f1"]) == given.lower()


GIVEN = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("meta", "source"),
    [
        ({"uid": GIVEN}, "json"),
        ({"uid": GIVEN.upper()}, "json"),
        (None, "derived"),
        ({"url": "x"}, "derived"),
        ({"uid": None}, "derived"),
        ({"uid": GIVEN[:31]}, "malformed_uid"),
        ({"uid": GIVEN + "0"}, "malformed_uid"),
        ({"uid": "g" * 32}, "malformed_uid"),
        ({"uid": ""}, "malformed_uid"),
        ({"uid": f" {GIVEN}"}, "malformed_uid"),
        ({"uid": int(GIVEN[:30], 16)}, "malformed_uid"),
        ({"uid": [GIVEN]}, "malformed_uid"),
    ],
)
def test_uid_source_of_each_json_uid_form(meta, source):
    uid, got = uid_and_source("00042", "k1", meta)
    assert got == source
    derived = hashlib.md5(b"00042/k1").hexdigest()
    assert uid == (GIVEN if source == "json" else derived)


def test_reader_reports_where_each_uid_came_from(tmp_path):
    """A malformed json uid is derived instead and flagged; the sample is kept."""
    uids = [GIVEN, "not a uid", None, GIVEN.upper()[:20]]
    samples = []
    for i, uid in enumerate(uids):
        meta = json.dumps({"caption": f"c{i}", **({"uid": uid} if uid else {})}).encode()
        samples.append((f"{i:04d}", {"json": meta, "jpg": b"x"}))
    path = write_shard(tmp_path / "s.tar", samples)
    got = [(s["key"], s["uid"], s["uid_source"]) for s in iter_samples(str(path))]
    md5 = [hashlib.md5(f"s/{i:04d}".encode()).hexdigest() for i in range(4)]
    assert got == [
        ("0000", GIVEN, "json"),
        ("0001", md5[1], "malformed_uid"),
        ("0002", md5[2], "derived"),
        ("0003", md5[3], "malformed_uid"),
    ]


def test_sources_braces_globs_and_fsspec_urls(corpus3):
    root = corpus3[0].parent
    assert expand_sources([f"{root}/{{00000..00002}}.tar"]) == [str(p) for p in corpus3]
    assert expand_sources([f"{root}/*.tar"]) == [str(p) for p in corpus3]
    assert shard_stem(f"file://{corpus3[1]}") == "00001"
    samples = list(iter_samples(f"simplecache::file://{corpus3[1]}"))
    assert [s["key"] for s in samples] == [s["key"] for s in iter_samples(str(corpus3[1]))]
    with pytest.raises(UsageError, match="source not found"):
        expand_sources([f"{root}/missing.tar"])


def _cut_points(path):
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    last = members[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    return [members[5].offset, members[5].offset + 100, members[5].offset_data + 10, end, end + 512]


def test_truncated_tars_fail_the_shard_even_when_cut_in_a_header(corpus3, tmp_path):
    data = corpus3[0].read_bytes()
    for cut in _cut_points(corpus3[0]):
        bad = tmp_path / f"cut{cut}.tar"
        bad.write_bytes(data[:cut])
        with pytest.raises(ShardError, match="truncated tar|corrupt tar"):
            list(iter_samples(str(bad)))
    whole = tmp_path / "whole.tar"
    whole.write_bytes(data)
    assert len(list(iter_samples(str(whole)))) == 40


def _datacomp_dir(root, rows=(5, 3), dim=8):
    rng = np.random.default_rng(0)
    for i, n in enumerate(rows):
        uids = [f"{rng.integers(2**63):016x}{rng.integers(2**63):016x}" for _ in range(n)]
        pq.write_table(
            pa.table(
                {
                    "uid": uids,
                    "text": [f"caption {j}" for j in range(n)],
                    "url": [f"http://x/{j}" for j in range(n)],
                }
            ),
            root / f"{i:08d}.parquet",
        )
        vec = rng.normal(size=(2, n, dim)).astype(np.float16)
        np.savez(root / f"{i:08d}.npz", l14_img=vec[0], l14_txt=vec[1], b32_img=vec[0][:, :4])
    return root


def test_datacomp_metadata_reads_through_the_store_reader(tmp_path):
    root = _datacomp_dir(tmp_path)
    assert finished_stems(root) == ["00000000", "00000001"]
    meta, arrays = read_stem(root, "00000000", ["l14_img", "l14_txt"], columns=["uid", "caption"])
    assert meta.num_rows == 5 and meta["caption"].to_pylist()[0] == "caption 0"
    assert arrays["l14_img"].shape == (5, 8) and arrays["l14_txt"].dtype == np.float16
    with np.load(root / "00000000.npz") as npz:
        np.testing.assert_array_equal(arrays["l14_txt"], npz["l14_txt"])
    with pytest.raises(ShardError, match="has no array 'img'"):
        read_arrays(root, "00000000", ["img"])


def test_store_length_mismatch_and_object_arrays_fail_the_shard(tmp_path):
    meta = pa.table({"uid": ["a" * 32, "b" * 32]})
    write_stem(tmp_path, "s", meta, {"img": np.zeros((2, 4), np.float16)}, {})
    save_npz_atomic(tmp_path / "s.npz", {"img": np.zeros((3, 4), np.float16)})
    with pytest.raises(ShardError, match="s.npz: size 284 bytes, its marker says 276"):
        read_stem(tmp_path, "s", ["img"])
    (tmp_path / "s.done.json").unlink()  # a store without markers (DataComp): lengths checked
    with pytest.raises(ShardError, match="parquet has 2 rows but npz array 'img' has 3"):
        read_stem(tmp_path, "s", ["img"])
    np.savez(tmp_path / "s.npz", img=np.array([{"x": 1}, None], dtype=object))
    with pytest.raises(ShardError, match="refusing to unpickle|2-d float"):
        read_arrays(tmp_path, "s", ["img"])
    save_npz_atomic(tmp_path / "s.npz", {"img": np.zeros((2, 4), np.int64)})
    with pytest.raises(ShardError, match="2-d float matrix"):
        read_arrays(tmp_path, "s", ["img"])


def test_unfinished_stems_are_left_out_with_a_warning(tmp_path):
    for stem in ("a", "b"):
        write_stem(tmp_path, stem, pa.table({"uid": ["0" * 32]}), {"img": np.ones((1, 2))}, {})
    (tmp_path / "b.done.json").write_text("{corrupt")
    with pytest.warns(UserWarning, match="unfinished stem"):
        assert finished_stems(tmp_path) == ["a"]
    assert read_meta(tmp_path, "a").num_rows == 1


def test_torch_save_atomic_gives_the_same_bytes_every_time(tmp_path):
    import torch

    obj = {"x": torch.arange(6.0).reshape(2, 3), "n": 3}
    first, again = tmp_path / "a" / "x.pt", tmp_path / "b" / "x.pt"
    for path in (first, again):
        path.parent.mkdir()
        torch_save_atomic(obj, path)
    assert first.read_bytes() == again.read_bytes()
    loaded = torch.load(again, weights_only=True)
    assert torch.equal(loaded["x"], obj["x"]) and loaded["n"] == 3


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
