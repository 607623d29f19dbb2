"""`score` over damaged embedding stores: every stem completes with all rows accounted for, fails
alone with a one-line reason, or is left out with a warning; no traceback; no truncated file."""

from __future__ import annotations

import json
import re
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
    BAD_LOGIT_SCALES,
    SCORE_REASONS,
    STORE_FAULTS,
    TARGET_FAULTS,
    Stem,
    build_stem,
    write_target,
)
from faults.harness import (
    error_lines,
    failure_covers,
    fault_settings,
    invoke,
    temp_files,
    unparseable_files,
)

EXAMPLES = 60
DIM = 8
SETTINGS = fault_settings(EXAMPLES)
METRIC_SETS = {
    "default": ((), True),
    "clipscore": (("--metric", "clipscore"), True),
    "negclip": (("--metric", "negclip"), True),
    "normsim": (
        (
            "--metric",
            "clipscore",
            "--metric",
            "negclip",
            "--metric",
            "normsim",
            "--p",
            "inf",
            "--p",
            "2",
        ),
        True,
    ),
    "normsim_only": (("--metric", "normsim", "--p", "inf", "--p", "3"), False),
}

stem_plans = st.fixed_dictionaries(
    {
        "n": st.integers(0, 12),
        "faults": st.lists(st.sampled_from(STORE_FAULTS), max_size=3),
        "seed": st.integers(0, 2**16),
    }
)
plans = st.fixed_dictionaries(
    {
        "stems": st.lists(stem_plans, min_size=1, max_size=4),
        "metrics": st.sampled_from(sorted(METRIC_SETS)),
        "target_fault": st.one_of(st.none(), st.none(), st.none(), st.sampled_from(TARGET_FAULTS)),
        "batch": st.sampled_from(["2", "4", "16"]),
        "k": st.sampled_from(["1", "2"]),
        "window": st.sampled_from(["1", "6", "20", "1000"]),
        "seed": st.integers(0, 100),
    }
)


def _columns(metrics: str) -> list[str]:
    return {
        "default": ["clipscore", "negclip"],
        "clipscore": ["clipscore"],
        "negclip": ["negclip"],
        "normsim": ["clipscore", "negclip", "normsim_inf", "normsim_2"],
        "normsim_only": ["normsim_inf", "normsim_3"],
    }[metrics]


def tally(stems: list[Stem], out: Path):
    """The rows of the stems finished in `out`, against what their done markers count."""
    finished = [s for s in stems if (out / f"{s.stem}.done.json").is_file()]
    markers = [out / f"{s.stem}.done.json" for s in finished]
    return tally_markers(sum(len(s.uids) for s in finished), markers)


def check_complete_stem(stem: Stem, out: Path, metrics: str, target: np.ndarray | None) -> None:
    """The sidecar holds exactly the valid rows, in order, with correct finite scores."""
    needs_txt = METRIC_SETS[metrics][1]
    marker = json.loads((out / f"{stem.stem}.done.json").read_text())
    keep, skipped = stem.valid(needs_txt)
    assert marker["read"] == len(stem.uids), (stem.stem, marker, stem.faults)
    assert tally([stem], out).lost == 0, (stem.stem, marker)
    assert marker["skipped"] == skipped, (stem.stem, marker["skipped"], skipped, stem.faults)
    assert set(marker["skipped"]) <= SCORE_REASONS
    assert marker["rows"] == len(keep)
    table = pq.read_table(out / f"{stem.stem}.scores.parquet")
    assert table.column_names == ["uid", *_columns(metrics)]
    assert table.column("uid").to_pylist() == [stem.uids[i] for i in keep]
    img = stem.img[keep].astype(np.float64)
    txt = stem.txt[keep].astype(np.float64)
    for name in _columns(metrics):
        values = table.column(name).to_numpy()
        assert values.dtype == np.float32 and np.isfinite(values).all(), (name, stem.faults)
    if "clipscore" in table.column_names:
        expected = np.einsum("ij,ij->i", img, txt)
        np.testing.assert_allclose(table.column("clipscore").to_numpy(), expected, atol=2e-5)
    if target is not None and len(keep):
        sims = np.abs(img @ target.astype(np.float64).T)
        np.testing.assert_allclose(
            table.column("normsim_inf").to_numpy(), sims.max(axis=1), atol=2e-5
        )
        if "normsim_2" in table.column_names:
            np.testing.assert_allclose(
                table.column("normsim_2").to_numpy(), np.sqrt((sims**2).sum(axis=1)), atol=2e-5
            )


def build_store(root: Path, plan: dict) -> tuple[list[Stem], list[str], np.ndarray | None, str]:
    """The damaged store and target of a plan: (stems, options, target rows, target outcome)."""
    with_target = plan["metrics"] in ("normsim", "normsim_only")
    stems = [
        build_stem(root / "store", f"s{i}", p["n"], DIM, p["faults"], p["seed"])
        for i, p in enumerate(plan["stems"])
    ]
    options = list(METRIC_SETS[plan["metrics"]][0])
    target, target_expect = None, "ok"
    if with_target:
        rng = np.random.default_rng(plan["seed"])
        path, target_expect = write_target(root, rng, 5, DIM, plan["target_fault"])
        options += ["--target", str(path)]
        if target_expect != "refuse":
            rows = np.load(path, allow_pickle=False).astype(np.float64)
            target = rows / np.linalg.norm(rows, axis=1, keepdims=True)  # SPEC §4: T normalised
    return stems, options, target, target_expect


def plan_windows(counts: list[tuple[str, int]], window: int, batch: int) -> list[list[str]]:
    """SPEC windows: consecutive stems of >= `window` rows; a remainder < B joins the last one."""
    groups: list[list[str]] = []
    current: list[str] = []
    size = 0
    for stem, rows in counts:
        current.append(stem)
        size += rows
        if size >= window:
            groups.append(current)
            current, size = [], 0
    if current and groups and size < batch:
        groups[-1].extend(current)
    elif current:
        groups.append(current)
    return groups


def expected_outcomes(
    stems: list[Stem], plan: dict, needs_txt: bool, target_dim: int | None
) -> dict[str, str]:
    """Each stem's outcome; within a window, stems not of the most common dim fail."""
    all_without_done = not any(s.has_done for s in stems)
    outcomes = {s.stem: s.outcome(needs_txt, target_dim, all_without_done) for s in stems}
    counts = [(s.stem, s.parquet_rows) for s in stems if outcomes[s.stem] != "excluded"]
    by_name = {s.stem: s for s in stems}
    for group in plan_windows(counts, int(plan["window"]), int(plan["batch"])):
        opened = [by_name[name] for name in group if outcomes[name] == "complete"]
        dims = Counter(s.img.shape[1] for s in opened)
        if dims:
            major = dims.most_common(1)[0][0]
            for s in opened:
                if s.img.shape[1] != major:
                    outcomes[s.stem] = "fail"
    return outcomes


def run_and_check(
    root: Path, stems: list[Stem], options: list[str], plan: dict, target, target_expect: str
) -> None:
    """Run `score` and check every guarantee; records the figures first."""
    out = root / "scores"
    summary_path = root / "summary.json"
    score_args = ["score", root / "store", "--out", out, "--device", "cpu"]
    score_args += ["--batch-size", plan["batch"], "--k", plan["k"], "--window", plan["window"]]
    score_args += ["--seed", str(plan["seed"]), *options]
    targets = [Path(options[i + 1]) for i, o in enumerate(options) if o == "--target"]
    digest = input_digest([root / "store", *targets])
    run = invoke(*score_args, "--json", summary_path)
    needs_txt = METRIC_SETS[plan["metrics"]][1]
    target_dim = target.shape[1] if target is not None else None
    outcomes = expected_outcomes(stems, plan, needs_txt, target_dim)
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    finished = [s for s in stems if (out / f"{s.stem}.done.json").is_file()]
    damaged = [f for s in stems for f in s.faults]
    if "--target" in options and plan.get("target_fault"):
        damaged.append(f"target_{plan['target_fault']}")
    FIGURES.record_run("score", digest, damaged, run.crash, tally(stems, out))
    assert run.crash is None, run.crash
    refused = target_expect == "refuse" or all(o == "excluded" for o in outcomes.values())
    if refused:
        assert run.exit_code == 2, run.output
        assert len(error_lines(run.output)) == 1, run.output
        assert not out.exists() or not list(out.glob("*.scores.parquet"))
        return
    assert summary is not None, run.output
    failed = summary["failed"]
    for stem in stems:
        outcome = outcomes[stem.stem]
        sidecar = out / f"{stem.stem}.scores.parquet"
        if outcome == "complete":
            assert stem.stem in {s.stem for s in finished}, (stem.stem, stem.faults, failed)
            check_complete_stem(stem, out, plan["metrics"], target)
        elif outcome == "fail":
            assert failure_covers(failed, stem.stem), (stem.stem, stem.faults, failed)
            assert not sidecar.exists() and stem not in finished
        else:
            assert not sidecar.exists(), (stem.stem, stem.faults)
    excluded = sum(o == "excluded" for o in outcomes.values())
    if excluded:
        assert re.search(rf"Warning: {excluded} unfinished stem\(s\) left out", run.output)
    for reason in failed.values():
        assert reason and "\n" not in reason
    assert run.exit_code == (1 if failed else 0), run.output
    assert bool(failed) == ("fail" in outcomes.values()), (failed, outcomes)
    assert unparseable_files(out) == [] and temp_files(out) == []

    before = {p.name: p.read_bytes() for p in out.glob("*.scores.parquet")}
    again = invoke(*score_args)
    FIGURES.record_run("score", digest, damaged, again.crash, tally(stems, out))
    assert again.crash is None and again.exit_code == run.exit_code
    assert {p.name: p.read_bytes() for p in out.glob("*.scores.parquet")} == before


@SETTINGS
@given(plan=plans)
def test_score_over_damaged_stores(plan):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        stems, options, target, target_expect = build_store(root, plan)
        run_and_check(root, stems, options, plan, target, target_expect)


BASE_PLAN = {"batch": "4", "k": "2", "window": "6", "seed": 3, "metrics": "normsim"}


@pytest.mark.parametrize("fault", STORE_FAULTS)
def test_each_store_fault_beside_good_stems(fault, tmp_path):
    plan = {
        **BASE_PLAN,
        "target_fault": None,
        "stems": [
            {"n": 9, "faults": [fault], "seed": 2},
            {"n": 7, "faults": [], "seed": 1},
            {"n": 5, "faults": [], "seed": 4},
        ],
    }
    stems, options, target, target_expect = build_store(tmp_path, plan)
    run_and_check(tmp_path, stems, options, plan, target, target_expect)


@pytest.mark.parametrize("fault", TARGET_FAULTS)
def test_each_target_fault(fault, tmp_path):
    plan = {
        **BASE_PLAN,
        "target_fault": fault,
        "stems": [{"n": 6, "faults": [], "seed": 1}, {"n": 6, "faults": [], "seed": 2}],
    }
    stems, options, target, target_expect = build_store(tmp_path, plan)
    run_and_check(tmp_path, stems, options, plan, target, target_expect)


@pytest.mark.parametrize("value", BAD_LOGIT_SCALES)
def test_a_bad_recorded_logit_scale_falls_back_to_the_default_tau(value, tmp_path):
    stems = []
    for i in range(2):
        stems.append(build_stem(tmp_path / "store", f"s{i}", 6, DIM, [], i))
        marker = tmp_path / "store" / f"s{i}.done.json"
        marker.write_text(marker.read_text().replace("100.0", value))
    digest = input_digest([tmp_path / "store"])
    run = invoke(
        "score",
        tmp_path / "store",
        "--out",
        tmp_path / "o",
        "--batch-size",
        "4",
        "--k",
        "2",
        "--json",
        tmp_path / "summary.json",
    )
    faults = ["bad_logit_scale"] * 2
    FIGURES.record_run("score", digest, faults, run.crash, tally(stems, tmp_path / "o"))
    assert run.crash is None and run.exit_code == 0, run.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tau"] == 0.01 and summary["tau_source"] == "default"
    for i in range(2):
        negclip = pq.read_table(tmp_path / "o" / f"s{i}.scores.parquet").column("negclip")
        assert np.isfinite(negclip.to_numpy()).all()


def test_corrupt_markers_in_the_score_output_are_redone_identically(tmp_path):
    plan = {
        **BASE_PLAN,
        "metrics": "default",
        "window": "1",
        "stems": [{"n": 8, "faults": [], "seed": s} for s in range(4)],
    }
    stems, options, _, _ = build_store(tmp_path, plan)
    out = tmp_path / "scores"
    args = ("score", tmp_path / "store", "--out", out, "--batch-size", "4", "--k", "2")
    first = invoke(*args, "--window", "1")
    assert first.exit_code == 0, first.output
    before = {p.name: p.read_bytes() for p in out.glob("*.scores.parquet")}
    (out / "s1.done.json").write_bytes(b'{"rows": 8, "config"')
    (out / "s2.done.json").write_bytes(b"[]")
    (out / "s3.scores.parquet").write_bytes(b"PAR1 truncated by someone else")
    (out / "s3.done.json").unlink()
    digest = input_digest([tmp_path / "store", out])
    again = invoke(*args, "--window", "1")
    faults = ["corrupt_done", "corrupt_done", "truncated_sidecar"]
    FIGURES.record_run("score", digest, faults, again.crash, tally(stems, out))
    assert again.crash is None and again.exit_code == 0, again.output
    assert "3 done, 1 already done" in again.output
    assert {p.name: p.read_bytes() for p in out.glob("*.scores.parquet")} == before


def test_a_stem_of_another_dim_fails_alone(tmp_path):
    stems = [
        build_stem(tmp_path / "store", f"s{i}", 6, DIM, faults, i)
        for i, faults in enumerate([[], ["other_dim"], []])
    ]
    out = tmp_path / "scores"
    digest = input_digest([tmp_path / "store"])
    run = invoke("score", tmp_path / "store", "--out", out, "--batch-size", "4", "--k", "2")
    FIGURES.record_run("score", digest, ["other_dim"], run.crash, tally(stems, out))
    assert run.crash is None and run.exit_code == 1
    assert (out / "s0.done.json").is_file() and (out / "s2.done.json").is_file()
    assert not (out / "s1.done.json").exists()


def test_subprocess_score_has_no_traceback_on_stderr(tmp_path):
    faults = ["nan_rows", "npz_short", "corrupt_done", "int_dtype", "truncated_parquet", "no_done"]
    stems = [build_stem(tmp_path / "store", f"s{i}", 6, DIM, [f], i) for i, f in enumerate(faults)]
    stems.append(build_stem(tmp_path / "store", "s9", 6, DIM, [], 9))
    rng = np.random.default_rng(0)
    target, _ = write_target(tmp_path, rng, 4, DIM, None)
    out = tmp_path / "scores"
    digest = input_digest([tmp_path / "store", target])
    proc = run_cli(
        "score",
        tmp_path / "store",
        "--out",
        out,
        "--batch-size",
        "4",
        "--k",
        "2",
        "--window",
        "1",
        "--metric",
        "negclip",
        "--metric",
        "normsim",
        "--target",
        target,
        "--json",
        tmp_path / "summary.json",
    )
    crash = "Traceback in stderr" if "Traceback" in proc.stdout + proc.stderr else None
    finished = [s for s in stems if (out / f"{s.stem}.done.json").is_file()]
    FIGURES.record_run("score", digest, faults, crash, tally(stems, out))
    assert crash is None, proc.stderr
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Warning: 2 unfinished stem(s) left out" in proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {s.stem for s in finished} == {"s0", "s9"}
    for stem in ("s1", "s3", "s4"):
        assert failure_covers(summary["failed"], stem)
    assert unparseable_files(out) == []


def test_zero_norm_rows_score_zero_clipscore(tmp_path):
    """A zero embedding is finite: it is scored (CLIPScore 0), not skipped."""
    stem = build_stem(tmp_path / "store", "z", 8, DIM, [], 0)
    img = stem.img.copy()
    img[:3] = 0
    np.savez(tmp_path / "store" / "z.npz", img=img, txt=stem.txt)
    digest = input_digest([tmp_path / "store"])
    run = invoke(
        "score", tmp_path / "store", "--out", tmp_path / "o", "--batch-size", "4", "--k", "1"
    )
    FIGURES.record_run(
        "score", digest, ["zero_norm_rows"], run.crash, tally([stem], tmp_path / "o")
    )
    assert run.crash is None and run.exit_code == 0
    table = pq.read_table(tmp_path / "o" / "z.scores.parquet")
    assert table.num_rows == 8
    np.testing.assert_array_equal(table.column("clipscore").to_numpy()[:3], 0)
    assert np.isfinite(table.column("negclip").to_numpy()).all()
