"""`reshard` over damaged source shards: the output holds exactly the subset's samples from the
readable shards, once each with their original bytes; a broken shard fails alone in one line."""

from __future__ import annotations

import json
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from hypothesis import given
from hypothesis import strategies as st

from faults.figures import FIGURES, input_digest, tally_reshard
from faults.generator import (
    NAME_FAULTS,
    SAMPLE_FAULTS,
    SHARD_FAULTS,
    Shard,
    build_shard,
    subset_pairs,
)
from faults.harness import fault_settings, invoke, temp_files, unparseable_files

RESHARD_FAULTS = SAMPLE_FAULTS + NAME_FAULTS

EXAMPLES = 40
SETTINGS = fault_settings(EXAMPLES)
shard_plans = st.fixed_dictionaries(
    {
        "n": st.integers(0, 10),
        "faults": st.lists(st.sampled_from(RESHARD_FAULTS), max_size=4),
        "shard_fault": st.one_of(st.none(), st.none(), st.sampled_from(SHARD_FAULTS)),
        "seed": st.integers(0, 2**16),
    }
)
plans = st.fixed_dictionaries(
    {
        "shards": st.lists(shard_plans, min_size=1, max_size=3),
        "share": st.sampled_from([0.0, 0.3, 0.7, 1.0]),
        "shard_size": st.sampled_from(["1", "3", "100"]),
        "seed": st.integers(0, 2**16),
    }
)


def read_output(out: Path) -> list[tuple[str, dict[str, bytes]]]:
    """Samples of the output shards in order, read with tarfile (consecutive members by key);
    every tar must also pass tarfile's `data` extraction filter."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    for path in sorted(out.glob("[0-9]*.tar")):
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                tarfile.data_filter(member, str(out / "unpack"))
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                if not samples or samples[-1][0] != key or path.name != samples[-1][2]:
                    samples.append((key, {}, path.name))
                samples[-1][1][ext] = data
    return [(key, files) for key, files, _ in samples]


def expected_output(shards: list[Shard], done: list[str], subset: set[str]) -> list[tuple]:
    """(key, uid, files) of the subset's samples in source order, first occurrence of a uid."""
    seen: set[str] = set()
    out = []
    for shard in shards:
        if shard.stem not in done:
            continue
        for s in shard.samples:
            uid = s.uid(shard.stem)
            if s.copy_problem is None and uid in subset and uid not in seen:
                seen.add(uid)
                out.append((s.clean_key, uid, dict(s.members)))
    return out


def run_and_check(root: Path, shards: list[Shard], subset: set[str], shard_size: str) -> None:
    """Run `reshard` and check the output sample by sample; records the figures first."""
    subset_path = root / "subset.npy"
    np.save(subset_path, np.sort(subset_pairs(sorted(subset))))
    out = root / "out"
    summary_path = root / "summary.json"
    args = [
        "reshard",
        *[str(s.path) for s in shards],
        "--subset",
        str(subset_path),
        "--out",
        str(out),
        "--shard-size",
        shard_size,
        "--json",
        str(summary_path),
    ]
    digest = input_digest([*(s.path for s in shards), subset_path])
    faults = [f for s in shards for f in s.faults]
    run = invoke(*args)
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    done = summary["done"] if summary else []
    expected = expected_output(shards, done, subset)
    got = read_output(out) if out.exists() else []
    finished = [s for s in shards if s.stem in done]
    read = sum(len(s.samples) for s in finished)
    FIGURES.record_run("reshard", digest, faults, run.crash, tally_reshard(read, summary_path))
    assert run.crash is None, run.crash
    assert summary is not None, run.output
    for shard in shards:
        if shard.expect == "complete":
            assert shard.stem in done, (shard.stem, shard.faults, summary["failed"])
        elif shard.expect == "fail":
            assert shard.stem in summary["failed"], (shard.stem, shard.faults)
        if shard.stem in summary["failed"]:
            assert "\n" not in summary["failed"][shard.stem]
        else:
            assert shard.stem in done
    assert run.exit_code == (1 if summary["failed"] else 0), run.output
    assert summary["read"] == sum(len(s.samples) for s in finished)
    assert summary["written"] == len(expected) == len(got)
    for (key, uid, files), (out_key, out_files) in zip(expected, got):
        assert out_key in (key, f"{key}_{uid}"), (out_key, key)
        assert out_files == files, key
    assert summary["not_found"] == len(subset - {uid for _, uid, _ in expected})
    skipped = Counter(s.copy_problem for shard in finished for s in shard.samples)
    del skipped[None]
    assert summary["skipped"] == dict(skipped), (summary["skipped"], faults)
    assert tally_reshard(read, summary_path).lost == 0
    assert unparseable_files(out) == [] and temp_files(out) == []
    assert (out / ".parts").exists() == bool(summary["failed"])

    before = _outputs(out)
    again = invoke(*args)
    FIGURES.record_run("reshard", digest, faults, again.crash, tally_reshard(read, summary_path))
    assert again.crash is None and again.exit_code == run.exit_code
    assert _outputs(out) == before


def _outputs(out: Path) -> dict[str, bytes]:
    """Every output file but the run record (which lists what this run did)."""
    return {
        p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "reshard.json"
    }


def _subset(shards: list[Shard], share: float, seed: int) -> set[str]:
    rng = np.random.default_rng(seed)
    uids = {s.uid(shard.stem) for shard in shards for s in shard.samples}
    picked = {u for u in sorted(uids) if rng.random() < share}
    return picked | {rng.bytes(16).hex() for _ in range(2)}


@SETTINGS
@given(plan=plans)
def test_reshard_over_damaged_shards(plan):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = [
            build_shard(root / "src", f"s{i}", p["seed"], p["n"], p["faults"], p["shard_fault"])
            for i, p in enumerate(plan["shards"])
        ]
        subset = _subset(shards, plan["share"], plan["seed"])
        run_and_check(root, shards, subset, plan["shard_size"])


@pytest.mark.parametrize("fault", [*RESHARD_FAULTS, *SHARD_FAULTS])
def test_each_fault_in_reshard(fault, tmp_path):
    sample_faults, shard_fault = ([fault] * 3, None) if fault in RESHARD_FAULTS else ([], fault)
    shards = [
        build_shard(tmp_path / "src", "a", 1, 6, []),
        build_shard(tmp_path / "src", "b", 2, 8, sample_faults, shard_fault),
    ]
    run_and_check(tmp_path, shards, _subset(shards, 0.8, 0), "4")


def test_subprocess_reshard_has_no_traceback_on_stderr(tmp_path):
    shards = [
        build_shard(tmp_path / "src", f"s{i}", i, 6, list(RESHARD_FAULTS[i::4]), fault)
        for i, fault in enumerate((None, "truncate", "garbage", "flip_header"))
    ]
    subset = _subset(shards, 1.0, 0)
    np.save(tmp_path / "subset.npy", np.sort(subset_pairs(sorted(subset))))
    digest = input_digest([*(s.path for s in shards), tmp_path / "subset.npy"])
    proc = run_cli(
        "reshard",
        *[s.path for s in shards],
        "--subset",
        tmp_path / "subset.npy",
        "--out",
        tmp_path / "out",
        "--shard-size",
        "5",
    )
    crash = "Traceback in stderr" if "Traceback" in proc.stdout + proc.stderr else None
    manifest_path = tmp_path / "out" / "reshard.json"
    manifest = json.loads(manifest_path.read_text())
    read = sum(len(s.samples) for s in shards if s.stem in manifest["done"])
    faults = [f for s in shards for f in s.faults]
    FIGURES.record_run("reshard", digest, faults, crash, tally_reshard(read, manifest_path))
    assert crash is None, proc.stderr
    assert proc.returncode == (1 if any(s.expect != "complete" for s in shards) else 0)
    assert "s0" in manifest["done"]
    assert unparseable_files(tmp_path / "out") == []
