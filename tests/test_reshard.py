"""`mmcurate reshard`: exactly the subset's samples, once each, with their original bytes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner

from mmcurate.cli.main import Group
from mmcurate.cli.select_cmd import reshard_cmd, select_cmd
from mmcurate.curate.reshard import ReshardConfig
from mmcurate.curate.reshard import reshard as reshard_stage
from mmcurate.data.atomic import save_npy_atomic
from mmcurate.data.shard_writer import write_shard
from mmcurate.data.uid import pair_to_uid, sample_uid, uid_pairs
from mmcurate.demo.corpus import generate_corpus
from mmcurate.engine import ExecutorConfig, LocalExecutor, make_executor

CLI = Group("mmcurate", commands={"select": select_cmd, "reshard": reshard_cmd})


def corpus_samples(paths: list[Path]) -> dict[str, dict[str, bytes]]:
    """uid -> {ext: bytes}, read with tarfile independently of mmcurate's reader."""
    import tarfile

    out: dict[str, dict[str, bytes]] = {}
    for path in paths:
        stem = path.name[: -len(".tar")]
        with tarfile.open(path) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                uid = sample_uid(stem, key, None)
                out.setdefault(uid, {})[ext] = tar.extractfile(member).read()
    return out


def read_back(out_dir: Path) -> list[dict]:
    """Every sample of the output shards, as webdataset.WebDataset yields them."""
    shards = sorted(str(p) for p in out_dir.glob("*.tar"))
    return list(wds.WebDataset(shards, shardshuffle=False)) if shards else []


def files_of(sample: dict) -> dict[str, bytes]:
    return {k: v for k, v in sample.items() if not k.startswith("__")}


def save_subset(path: Path, uids: list[str]) -> Path:
    save_npy_atomic(path, np.sort(uid_pairs(uids)))
    return path


@pytest.fixture
def corpus(tmp_path):
    paths = generate_corpus(tmp_path / "src", n_shards=3, per_shard=40, seed=1, image_size=16)
    return paths, corpus_samples(paths)


def reshard(sources, subset, out, shard_size, executor=None):
    """The reshard stage with one local worker unless told otherwise."""
    return reshard_stage(
        sources, subset, out, ReshardConfig(shard_size), executor or LocalExecutor(1, 1)
    )


def test_output_holds_exactly_the_subset_once_with_original_bytes(tmp_path, corpus):
    paths, samples = corpus
    rng = np.random.default_rng(0)
    chosen = list(rng.choice(sorted(samples), 50, replace=False))
    absent = ["f" * 32, "0" * 32]
    subset = save_subset(tmp_path / "subset.npy", chosen + absent)
    summary = reshard([str(p) for p in paths], subset, tmp_path / "out", shard_size=16)

    got = read_back(tmp_path / "out")
    by_bytes = {
        json.dumps(sorted((k, v.hex()) for k, v in f.items())): u for u, f in samples.items()
    }
    uids = [by_bytes[json.dumps(sorted((k, v.hex()) for k, v in files_of(s).items()))] for s in got]
    assert sorted(uids) == sorted(chosen)  # exactly the subset's samples, each once
    assert len(set(uids)) == len(uids)
    for sample in got:
        assert set(files_of(sample)) == {"jpg", "txt", "json"}
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.tar"))
    assert shards == [f"{i:05d}.tar" for i in range(math.ceil(50 / 16))]
    assert [
        len(list(wds.WebDataset(str(tmp_path / "out" / s), shardshuffle=False))) for s in shards
    ] == [
        16,
        16,
        16,
        2,
    ]
    assert summary["written"] == 50 and summary["read"] == 120
    assert summary["not_found"] == 2
    missing = np.load(tmp_path / "out" / "not_found.npy", allow_pickle=False)
    assert sorted(pair_to_uid(int(a), int(b)) for a, b in missing.tolist()) == sorted(absent)
    assert not (tmp_path / "out" / ".parts").exists()


def test_bytes_are_deterministic_across_runs_and_workers(tmp_path, corpus):
    paths, samples = corpus
    subset = save_subset(tmp_path / "subset.npy", sorted(samples)[::2])
    srcs = [str(p) for p in paths]
    reshard(srcs, subset, tmp_path / "a", shard_size=25)
    reshard(
        srcs,
        subset,
        tmp_path / "b",
        shard_size=25,
        executor=make_executor(ExecutorConfig(workers=2)),
    )
    names = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert names == sorted(p.name for p in (tmp_path / "b").glob("*.tar")) and names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_duplicates_first_occurrence_wins_and_clashing_keys_are_renamed(tmp_path):
    """Shard x repeats a uid within itself, shard y repeats one of x's uids and x's keys."""
    uid_a, uid_b, uid_c = "a" * 32, "b" * 32, "c" * 32

    def sample(key: str, uid: str, tag: str) -> tuple[str, dict[str, bytes]]:
        meta = json.dumps({"uid": uid, "tag": tag}).encode()
        return key, {"txt": tag.encode(), "json": meta, "jpg": tag.encode() * 3}

    x = write_shard(
        tmp_path / "x.tar",
        [sample("k1", uid_a, "x-a"), sample("k2", uid_b, "x-b"), sample("k3", uid_a, "x-a2")],
    )
    y = write_shard(tmp_path / "y.tar", [sample("k1", uid_c, "y-c"), sample("k2", uid_b, "y-b")])
    subset = save_subset(tmp_path / "subset.npy", [uid_a, uid_b, uid_c])
    summary = reshard([str(x), str(y)], subset, tmp_path / "out", shard_size=10)
    got = read_back(tmp_path / "out")
    assert sorted(s["txt"].decode() for s in got) == ["x-a", "x-b", "y-c"]
    assert len({s["__key__"] for s in got}) == 3
    assert summary["duplicates_within_shards"] == 1
    assert summary["duplicates_across_shards"] == 1
    assert summary["renamed_keys"] == 1 and summary["not_found"] == 0


def test_resume_after_a_failed_shard_redoes_only_that_shard(tmp_path, corpus):
    paths, samples = corpus
    good = paths[2].read_bytes()
    paths[2].write_bytes(good[: len(good) // 2])  # truncated tar
    subset = save_subset(tmp_path / "subset.npy", sorted(samples))
    args = ["reshard", *map(str, paths), "--subset", str(subset), "--out", str(tmp_path / "out")]
    args += ["--shard-size", "30"]
    first = CliRunner().invoke(CLI, args)
    assert first.exit_code == 1
    assert "00002: truncated tar" in first.output
    assert len(read_back(tmp_path / "out")) == 80
    assert json.loads((tmp_path / "out" / "reshard.json").read_text())["complete"] is False

    paths[2].write_bytes(good)
    second = CliRunner().invoke(CLI, [*args, "--json", str(tmp_path / "s.json")])
    assert second.exit_code == 0, second.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["already_done"] == ["00000", "00001"] and summary["done"] == ["00002"]
    got = read_back(tmp_path / "out")
    assert len(got) == 120 and summary["not_found"] == 0
    assert not (tmp_path / "out" / "not_found.npy").exists()

    stamps = {p.name: os.stat(p).st_mtime_ns for p in (tmp_path / "out").glob("*.tar")}
    third = CliRunner().invoke(CLI, args)
    assert third.exit_code == 0 and "already complete" in third.output
    assert stamps == {p.name: os.stat(p).st_mtime_ns for p in (tmp_path / "out").glob("*.tar")}


def test_a_new_subset_replaces_stale_output(tmp_path, corpus):
    paths, samples = corpus
    srcs = [str(p) for p in paths]
    reshard(srcs, save_subset(tmp_path / "big.npy", sorted(samples)), tmp_path / "out", 20)
    small = sorted(samples)[:15]
    summary = reshard(srcs, save_subset(tmp_path / "small.npy", small), tmp_path / "out", 20)
    assert summary["shards"] == ["00000.tar"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["00000.tar"]
    assert len(read_back(tmp_path / "out")) == 15


def test_select_then_reshard_end_to_end(tmp_path, corpus):
    """A subset written by `select` (via --union only) drives reshard."""
    paths, samples = corpus
    part = save_subset(tmp_path / "part.npy", sorted(samples)[:7])
    runner = CliRunner()
    sel = runner.invoke(CLI, ["select", "--union", str(part), "--out", str(tmp_path / "s.npy")])
    assert sel.exit_code == 0, sel.output
    res = runner.invoke(
        CLI,
        [
            "reshard",
            *map(str, paths),
            "--subset",
            str(tmp_path / "s.npy"),
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "written 7" in res.output
    assert len(read_back(tmp_path / "out")) == 7


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--shard-size", "0"], "--shard-size must be at least 1"),
        (["--subset", "nope.npy"], "subset file not found"),
    ],
)
def test_bad_reshard_input_is_one_line_exit_2(tmp_path, corpus, extra, needle):
    paths, samples = corpus
    subset = save_subset(tmp_path / "subset.npy", sorted(samples)[:3])
    args = ["reshard", str(paths[0]), "--subset", str(subset), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(CLI, [*args, *extra])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert needle in result.output
    assert not (tmp_path / "o").exists()
