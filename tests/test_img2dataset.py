"""img2dataset interop: embed keeps the uids of img2dataset/DataComp shards, and reshard writes
img2dataset's layout (NNNNN.tar + .parquet + _stats.json) with open_clip's sizes.json."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from click.testing import CliRunner
from open_clip_train.data import get_dataset_size

from mmcurate.cli.main import cli
from mmcurate.data.shard_writer import write_shard
from mmcurate.data.uid import pair_to_uid
from mmcurate.demo.corpus import encode_image, make_pairs

TINY = "open_clip:mmc-tiny"
PER_SHARD = 24
MALFORMED = {(1, 5): "not-a-uid", (2, 7): "ABC" * 11}  # (shard, sample) -> bad json uid


def img2dataset_shards(root: Path, n_shards: int = 3) -> tuple[list[Path], dict[str, dict]]:
    """Shards as img2dataset writes them (keys SSSSSIIII, json with its fields and DataComp's
    uid), with its parquet and stats beside each; returns the paths and uid -> json."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pairs = make_pairs(n_shards * PER_SHARD, seed=4, image_size=16)
    paths, truth = [], {}
    for s in range(n_shards):
        samples = []
        for i in range(PER_SHARD):
            j = s * PER_SHARD + i
            key = f"{s:05d}{i:04d}"
            meta = {
                "uid": MALFORMED.get((s, i), rng.bytes(16).hex()),
                "url": f"https://example.com/{j}.jpg",
                "caption": pairs["captions"][j],
                "key": key,
                "status": "success",
                "error_message": None,
                "width": 16,
                "height": 16,
                "original_width": int(rng.integers(100, 900)),
                "original_height": int(rng.integers(100, 900)),
                "sha256": hashlib.sha256(str(j).encode()).hexdigest(),
            }
            uid = (
                meta["uid"]
                if (s, i) not in MALFORMED
                else hashlib.md5(f"{s:05d}/{key}".encode()).hexdigest()
            )
            truth[uid] = meta
            files = {
                "jpg": encode_image(pairs["images"][j], "jpeg"),
                "txt": pairs["captions"][j].encode(),
                "json": json.dumps(meta, indent=4).encode(),
            }
            samples.append((key, files))
        paths.append(write_shard(root / f"{s:05d}.tar", samples))
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"count": PER_SHARD}))
    return paths, truth


@pytest.fixture
def shards(tmp_path):
    return img2dataset_shards(tmp_path / "src")


def invoke(*args) -> dict:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_embed_keeps_img2dataset_uids_and_derives_malformed_ones(tmp_path, shards):
    paths, truth = shards
    invoke("embed", *paths, "--out", tmp_path / "store", "--model", TINY, "--decode-workers", "0")
    uids = [
        u
        for p in paths
        for u in pq.read_table(tmp_path / "store" / f"{p.stem}.parquet")["uid"].to_pylist()
    ]
    assert sorted(uids) == sorted(truth)
    assert hashlib.md5(b"00001/000010005").hexdigest() in uids


def test_embed_summary_counts_uids_per_source(tmp_path, shards):
    paths, _ = shards
    summary = tmp_path / "summary.json"
    result = invoke(
        "embed",
        *paths,
        "--out",
        tmp_path / "store",
        "--model",
        TINY,
        "--decode-workers",
        "0",
        "--json",
        summary,
    )
    counts = json.loads(summary.read_text()).get("uid_sources")
    assert counts == {"json": 3 * PER_SHARD - len(MALFORMED), "malformed_uid": len(MALFORMED)}
    printed = f"uids by source: json {counts['json']}, malformed_uid {len(MALFORMED)}"
    assert printed in result.output


def test_selected_subset_reshards_into_img2dataset_layout(tmp_path, shards):
    paths, truth = shards
    store, scores, out = tmp_path / "store", tmp_path / "scores", tmp_path / "out"
    invoke("embed", *paths, "--out", store, "--model", TINY, "--decode-workers", "0")
    invoke("score", store, "--out", scores, "--metric", "clipscore")
    invoke("select", scores, "--out", tmp_path / "subset.npy", "--keep", "clipscore:0.5")
    subset = np.load(tmp_path / "subset.npy", allow_pickle=False)
    chosen = {pair_to_uid(int(a), int(b)) for a, b in zip(subset["f0"], subset["f1"])}
    assert len(chosen) == 3 * PER_SHARD // 2
    summary_path = tmp_path / "reshard.json"
    invoke(
        "reshard",
        *paths,
        "--subset",
        tmp_path / "subset.npy",
        "--out",
        out,
        "--shard-size",
        "10",
        "--json",
        summary_path,
    )
    summary = json.loads(summary_path.read_text())
    assert summary["uid_sources"] == {
        "json": 3 * PER_SHARD - len(MALFORMED),
        "malformed_uid": len(MALFORMED),
    }

    tars = sorted(p.name for p in out.glob("*.tar"))
    n_shards = -(-len(chosen) // 10)
    assert tars == [f"{i:05d}.tar" for i in range(n_shards)]
    stats = [json.loads((out / f"{i:05d}_stats.json").read_text()) for i in range(n_shards)]
    assert sum(s["successes"] for s in stats) == len(chosen)
    for s in stats:
        assert s["count"] == s["successes"] and s["failed_to_download"] == 0
        assert s["failed_to_resize"] == 0 and s["status_dict"] == {"success": s["count"]}
    assert json.loads((out / "sizes.json").read_text()) == {
        name: s["count"] for name, s in zip(tars, stats)
    }
    # open_clip's own size lookup, on the brace pattern a training command would get.
    pattern = str(out / f"{{00000..{n_shards - 1:05d}}}.tar")
    assert get_dataset_size(pattern) == (len(chosen), n_shards)

    read = list(wds.WebDataset(pattern, shardshuffle=False))
    assert len(read) == len(chosen)
    rows = [r for i in range(n_shards) for r in pq.read_table(out / f"{i:05d}.parquet").to_pylist()]
    assert [r["key"] for r in rows] == [s["__key__"] for s in read]
    for sample, row in zip(read, rows):
        meta = json.loads(sample["json"])
        uid = row["uid"]
        assert uid in chosen and truth[uid] == meta
        assert row["caption"] == sample["txt"].decode() == meta["caption"]
        assert row["url"] == meta["url"] and row["status"] == "success"
        assert row["error_message"] is None and row["sha256"] == meta["sha256"]
        for name in ("width", "height", "original_width", "original_height"):
            assert row[name] == meta[name]
    assert {r["uid"] for r in rows} == chosen


def test_reshard_layout_is_byte_identical_when_packed_again(tmp_path, shards):
    paths, truth = shards
    subset = tmp_path / "subset.npy"
    from mmcurate.data.uid import uid_pairs

    np.save(subset, np.sort(uid_pairs(sorted(truth)[::3])))
    out = tmp_path / "out"
    args = ["reshard", *paths, "--subset", subset, "--out", out, "--shard-size", "7"]
    invoke(*args)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "reshard.json"}
    assert {n for n in before if n.endswith(".parquet")} and "sizes.json" in before
    (out / "reshard.json").unlink()
    for name in [n for n in before if n.startswith("00001")]:
        (out / name).unlink()
    invoke(*args)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "reshard.json"} == before
    with tarfile.open(out / "00000.tar") as tar:
        assert all(m.isfile() for m in tar)
