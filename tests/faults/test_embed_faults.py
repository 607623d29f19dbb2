"""`embed` over damaged shards: every shard completes with all samples accounted for, or fails
alone with a one-line reason; no traceback; no truncated file under a final name."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from hypothesis import given
from hypothesis import strategies as st

from faults.figures import FIGURES, input_digest, tally_markers
from faults.generator import (
    CORRUPT_DONE,
    EMBED_REASONS,
    MAYBE,
    NAME_FAULTS,
    SAMPLE_FAULTS,
    SHARD_FAULTS,
    Shard,
    build_shard,
    expected_problem,
)
from faults.harness import TINY, fault_settings, invoke, temp_files, unparseable_files

EXAMPLES = 60
SETTINGS = fault_settings(EXAMPLES)

shard_plans = st.fixed_dictionaries(
    {
        "n": st.integers(0, 12),
        "faults": st.lists(st.sampled_from(SAMPLE_FAULTS + NAME_FAULTS), max_size=5),
        "shard_fault": st.one_of(st.none(), st.none(), st.sampled_from(SHARD_FAULTS)),
        "fmt": st.sampled_from(["jpg", "png"]),
        "seed": st.integers(0, 2**16),
    }
)
plans = st.fixed_dictionaries(
    {
        "shards": st.lists(shard_plans, min_size=1, max_size=3),
        "batch": st.sampled_from([1, 3, 8, 64]),
        "modality": st.sampled_from(["both", "both", "image", "text"]),
    }
)


def tally(shards: list[Shard], out: Path):
    """The samples of the shards finished in `out`, against what their done markers count."""
    finished = [s for s in shards if (out / f"{s.stem}.done.json").is_file()]
    markers = [out / f"{s.stem}.done.json" for s in finished]
    return tally_markers(sum(len(s.samples) for s in finished), markers)


def check_complete_shard(shard: Shard, out: Path, modality: str) -> None:
    """Every sample of a finished shard is written, in order, or skipped by the right reason."""
    stem = shard.stem
    done = json.loads((out / f"{stem}.done.json").read_text())
    skipped = Counter(done["skipped"])
    assert done["read"] == len(shard.samples), (stem, done, shard.faults)
    assert tally([shard], out).lost == 0, (stem, done, shard.faults)
    assert set(skipped) <= EMBED_REASONS, skipped
    meta = pq.read_table(out / f"{stem}.parquet").to_pylist()
    assert len(meta) == done["rows"]
    keys = {"both": {"img", "txt"}, "image": {"img"}, "text": {"txt"}}[modality]
    with np.load(out / f"{stem}.npz", allow_pickle=False) as npz:
        assert set(npz.files) == keys
        for key in keys:
            arr = npz[key]
            assert arr.dtype == np.float16 and arr.shape == (len(meta), 32)
            assert np.isfinite(arr.astype(np.float32)).all()

    problems = [expected_problem(s, modality) for s in shard.samples]
    certain = Counter(p for p in problems if p not in (None, MAYBE))
    maybe = problems.count(MAYBE)
    for reason in ("unsafe_name", "missing_image", "missing_caption"):
        assert skipped[reason] == certain[reason], (reason, skipped, shard.faults)
    undecodable = skipped["undecodable_image"]
    assert certain["undecodable_image"] <= undecodable <= certain["undecodable_image"] + maybe
    candidates = [s for s, p in zip(shard.samples, problems) if p in (None, MAYBE)]
    decoded = len(candidates) - (undecodable - certain["undecodable_image"])
    assert skipped["duplicate_uid"] == decoded - len(meta), (skipped, shard.faults)

    uids = [row["uid"] for row in meta]
    assert len(set(uids)) == len(uids), "a uid was written twice"
    position = -1
    for row in meta:
        match = next(
            (
                j
                for j, s in enumerate(shard.samples)
                if j > position
                and problems[j] in (None, MAYBE)
                and s.uid(stem) == row["uid"]
                and s.clean_key == row["key"]
                and s.caption == row["caption"]
            ),
            None,
        )
        assert match is not None, f"row {row['key']!r} matches no sample, in order"
        position = match
        assert row["shard"] == stem
    for s, p in zip(shard.samples, problems):
        if p is None:
            assert s.uid(stem) in uids, f"{s.clean_key!r} neither written nor its uid's twin"


def run_and_check(shards: list[Shard], root: Path, *options: str) -> None:
    """Run `embed` over the shards and check every guarantee; records the figures first."""
    out = root / "store"
    summary_path = root / "summary.json"
    modality = options[options.index("--modality") + 1] if "--modality" in options else "both"
    digest = input_digest([s.path for s in shards])
    run = invoke(
        "embed",
        *[str(s.path) for s in shards],
        "--out",
        str(out),
        "--model",
        TINY,
        "--decode-workers",
        "0",
        "--json",
        str(summary_path),
        *options,
    )
    faults = [f for s in shards for f in s.faults]
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    done = summary["done"] if summary is not None else []
    FIGURES.record_run(
        "embed", digest, faults, run.crash, tally([s for s in shards if s.stem in done], out)
    )
    errors: list[str] = []
    for shard in shards:
        if shard.stem in done:
            try:
                check_complete_shard(shard, out, modality)
            except AssertionError as exc:
                errors.append(f"{shard.stem}: {exc}")

    assert run.crash is None, run.crash
    assert summary is not None, run.output
    assert not errors, errors
    for shard in shards:
        if shard.expect == "complete":
            assert shard.stem in summary["done"], (shard.stem, shard.faults, summary["failed"])
        elif shard.expect == "fail":
            assert shard.stem in summary["failed"], (shard.stem, shard.faults, summary["done"])
        if shard.stem in summary["failed"]:
            reason = summary["failed"][shard.stem]
            assert reason and "\n" not in reason
            assert " ".join(f"{shard.stem}: {reason}".split()) in " ".join(run.output.split())
            assert not list(out.glob(f"{shard.stem}.*")), "a failed shard left final files"
        else:
            assert shard.stem in summary["done"], (shard.stem, run.output)
    assert run.exit_code == (1 if summary["failed"] else 0), run.output
    if out.exists():
        assert unparseable_files(out) == []
        assert temp_files(out) == []


@SETTINGS
@given(plan=plans)
def test_embed_over_damaged_shards(plan):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = [
            build_shard(
                root / "src", f"s{i}", p["seed"], p["n"], p["faults"], p["shard_fault"], p["fmt"]
            )
            for i, p in enumerate(plan["shards"])
        ]
        run_and_check(
            shards, root, "--batch-size", str(plan["batch"]), "--modality", plan["modality"]
        )


@pytest.mark.parametrize("fault", SAMPLE_FAULTS + NAME_FAULTS)
def test_each_sample_fault_beside_a_good_shard(fault, tmp_path):
    shards = [
        build_shard(tmp_path / "src", "bad", 7, 8, [fault, fault, fault]),
        build_shard(tmp_path / "src", "good", 8, 6, []),
    ]
    run_and_check(shards, tmp_path, "--batch-size", "4")


@pytest.mark.parametrize("fault", SHARD_FAULTS)
def test_each_shard_fault_beside_a_good_shard(fault, tmp_path):
    shards = [
        build_shard(tmp_path / "src", "bad", 3, 10, ["no_caption"], fault),
        build_shard(tmp_path / "src", "good", 4, 5, []),
    ]
    run_and_check(shards, tmp_path, "--batch-size", "4")


def test_decode_workers_count_the_same_skips(tmp_path):
    """The DataLoader worker path (the default) accounts for damaged samples the same way."""
    shard = build_shard(tmp_path / "src", "mixed", 11, 12, list(SAMPLE_FAULTS[:12]), fmt="png")
    digest = input_digest([shard.path])
    inline = invoke(
        "embed", shard.path, "--out", tmp_path / "a", "--model", TINY, "--decode-workers", "0"
    )
    workers = invoke(
        "embed",
        shard.path,
        "--out",
        tmp_path / "b",
        "--model",
        TINY,
        "--decode-workers",
        "2",
        "--batch-size",
        "3",
    )
    for run, out in ((inline, tmp_path / "a"), (workers, tmp_path / "b")):
        FIGURES.record_run("embed", digest, shard.faults, run.crash, tally([shard], out))
    assert inline.crash is None and workers.crash is None
    a = json.loads((tmp_path / "a" / "mixed.done.json").read_text())
    b = json.loads((tmp_path / "b" / "mixed.done.json").read_text())
    assert a["skipped"] == b["skipped"] and a["rows"] == b["rows"] and a["read"] == b["read"]
    check_complete_shard(shard, tmp_path / "b", "both")


def test_image_folder_with_broken_files(tmp_path):
    """An image folder with empty, non-image and dangling-symlink files: each one is skipped."""
    from mmcurate.demo.corpus import encode_image, make_pairs

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    pairs = make_pairs(3, seed=0, image_size=16)
    for i in range(3):
        (folder / "sub" / f"ok{i}.png").write_bytes(encode_image(pairs["images"][i], "png"))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_bytes(b"not an image")
    (folder / "dangling.jpg").symlink_to(folder / "nowhere.jpg")
    (folder / "dir.png").mkdir()
    (folder / "name\udcff.png").write_bytes(encode_image(pairs["images"][0], "png"))
    out = tmp_path / "store"
    digest = input_digest([folder])
    run = invoke(
        "embed",
        folder,
        "--out",
        out,
        "--model",
        TINY,
        "--modality",
        "image",
        "--decode-workers",
        "0",
    )
    faults = ["empty_file", "not_an_image", "dangling_symlink"]
    markers = [out / "images.done.json"] if (out / "images.done.json").is_file() else []
    FIGURES.record_run("embed", digest, faults, run.crash, tally_markers(7, markers))
    assert run.crash is None and run.exit_code == 0, run.output
    done = json.loads((out / "images.done.json").read_text())
    assert done["read"] == 7
    assert done["skipped"] == {"missing_image": 2, "undecodable_image": 1}
    keys = pq.read_table(out / "images.parquet").column("key").to_pylist()
    assert keys == ["name\ufffd.png", "sub/ok0.png", "sub/ok1.png", "sub/ok2.png"]


def test_subprocess_embed_has_no_traceback_on_stderr(tmp_path):
    """The real console entry point over every shard fault: one line per failed shard."""
    shards = [
        build_shard(tmp_path / "src", f"f{i}", i, 6, list(SAMPLE_FAULTS[i::6]), fault)
        for i, fault in enumerate((None, *SHARD_FAULTS))
    ]
    digest = input_digest([s.path for s in shards])
    proc = run_cli(
        "embed",
        *[s.path for s in shards],
        "--out",
        tmp_path / "store",
        "--model",
        TINY,
        "--decode-workers",
        "1",
        "--json",
        tmp_path / "summary.json",
    )
    crash = "Traceback in stderr" if "Traceback" in proc.stdout + proc.stderr else None
    summary = json.loads((tmp_path / "summary.json").read_text())
    finished = [s for s in shards if s.stem in summary["done"]]
    faults = [f for s in shards for f in s.faults]
    FIGURES.record_run("embed", digest, faults, crash, tally(finished, tmp_path / "store"))
    assert crash is None, proc.stderr
    assert proc.returncode == 1
    expected_fail = {s.stem for s in shards if s.expect == "fail"}
    assert expected_fail <= set(summary["failed"])
    assert {s.stem for s in shards if s.expect == "complete"} <= set(summary["done"])
    for stem in summary["failed"]:
        assert f"    {stem}: " in proc.stdout
    for shard in finished:
        check_complete_shard(shard, tmp_path / "store", "both")
    assert unparseable_files(tmp_path / "store") == []


def test_corrupt_done_markers_are_redone_identically(tmp_path):
    """A done.json that is not a marker (garbage, cut short, wrong shape) means: redo the stem."""
    shards = [build_shard(tmp_path / "src", f"s{i}", i, 5, []) for i in range(len(CORRUPT_DONE))]
    out = tmp_path / "store"
    args = ["embed", *[s.path for s in shards], "--out", out, "--model", TINY]
    first = invoke(*args, "--decode-workers", "0")
    assert first.exit_code == 0, first.output
    before = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.endswith(".json")}
    for shard, garbage in zip(shards, CORRUPT_DONE):
        (out / f"{shard.stem}.done.json").write_bytes(garbage)
    digest = input_digest([*(s.path for s in shards), out])
    again = invoke(*args, "--decode-workers", "0")
    faults = ["corrupt_done"] * len(shards)
    FIGURES.record_run("embed", digest, faults, again.crash, tally(shards, out))
    assert again.crash is None and again.exit_code == 0, again.output
    assert f"{len(shards)} done, 0 already done" in again.output
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.endswith(".json")} == (
        before
    )
    for shard in shards:
        check_complete_shard(shard, out, "both")
