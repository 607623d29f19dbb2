"""`select` over damaged sidecars and subset files: it writes the right subset, or refuses or
fails with one line; never a traceback, never a truncated subset file."""

from __future__ import annotations

import json
import math
import operator
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from hypothesis import given
from hypothesis import strategies as st

from faults.figures import FIGURES, input_digest, tally_select
from faults.generator import (
    METRIC_COLUMNS,
    SIDECAR_FAULTS,
    SUBSET_EXPECT,
    SUBSET_FAULTS,
    Evil,
    Sidecar,
    build_sidecar,
    build_subset,
)
from faults.harness import error_lines, fault_settings, invoke, temp_files, unparseable_files

EXAMPLES = 50
SETTINGS = fault_settings(EXAMPLES)
RULES = [
    *(f"{m}:{f}" for m in METRIC_COLUMNS for f in ("0.5", "0.3", "1", "0.01", "0.25")),
    *(f"{m}{op}{x}" for m in METRIC_COLUMNS for op in (">=", "<", ">") for x in ("-0.5", "0.3")),
]
sidecar_plans = st.fixed_dictionaries(
    {
        "n": st.integers(0, 15),
        "faults": st.lists(st.sampled_from(sorted(SIDECAR_FAULTS)), max_size=2),
        "seed": st.integers(0, 2**16),
    }
)
subset_plans = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {
            "fault": st.one_of(st.none(), st.sampled_from(SUBSET_FAULTS)),
            "seed": st.integers(0, 2**16),
        }
    ),
)
plans = st.fixed_dictionaries(
    {
        "sidecars": st.lists(sidecar_plans, min_size=1, max_size=3),
        "rules": st.lists(st.sampled_from(RULES), min_size=1, max_size=3),
        "union": subset_plans,
        "intersect": subset_plans,
    }
)


def _rule(text: str) -> tuple[str, str, str]:
    for op in (">=", "<=", ">", "<", ":"):
        if op in text:
            metric, _, value = text.partition(op)
            return metric, op, value
    raise ValueError(text)


def reference_select(sidecars: list[Sidecar], rules: list[str]) -> tuple[set[str], list[dict]]:
    """SPEC §5 by brute force: fractions of the whole pool, ties to the smaller uid, NaN never;
    thresholds compared at the column's precision (float64 when a sidecar stores it so)."""
    pool = [
        (uid, {m: s.scores[m][i] for m in METRIC_COLUMNS})
        for s in sidecars
        for i, uid in enumerate(s.uids)
    ]
    survivors = list(range(len(pool)))
    stages = []
    for text in rules:
        metric, op, value = _rule(text)
        values = {i: float(pool[i][1][metric]) for i in survivors}
        nan = sum(math.isnan(v) for v in values.values())
        if op == ":":
            target = math.floor(Fraction(value) * len(pool))
            ranked = sorted(
                (i for i in survivors if not math.isnan(values[i])),
                key=lambda i: (-values[i], pool[i][0]),
            )
            kept = sorted(ranked[:target])
        else:
            wide = any(
                pa.types.is_float64(pq.read_schema(s.path).field(metric).type) for s in sidecars
            )
            bound = float(value) if wide else float(np.float32(float(value)))
            compare = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
            kept = [i for i in survivors if compare[op](values[i], bound)]
        stages.append({"input": len(survivors), "count": len(kept), "nan": nan})
        survivors = kept
    return {pool[i][0] for i in survivors}, stages


def read_subset(path: Path) -> list[str]:
    arr = np.load(path, allow_pickle=False)
    assert arr.dtype == np.dtype("u8,u8") and arr.ndim == 1
    uids = [f"{int(p['f0']):016x}{int(p['f1']):016x}" for p in arr]
    assert uids == sorted(set(uids)), "subset must be sorted and unique"
    return uids


def run_and_check(root: Path, plan: dict) -> None:
    """Write the damaged inputs, run `select`, check the outcome; records the figures first."""
    scores = root / "scores"
    scores.mkdir(parents=True)
    sidecars: list[Sidecar] = []
    shared: list[str] = []
    for i, p in enumerate(plan["sidecars"]):
        sidecars.append(build_sidecar(scores, f"s{i}", p["n"], p["faults"], p["seed"], shared))
        shared = [u for s in sidecars for u in s.uids]
    rng = np.random.default_rng(len(shared))
    unknown = [rng.bytes(16).hex() for _ in range(3)]
    args = ["select", str(scores), "--out", str(root / "out" / "subset.npy")]
    for rule in plan["rules"]:
        args += ["--keep", rule]
    expects = set()
    damaged = [f for s in sidecars for f in s.faults]
    sets: dict[str, list[set[str]]] = {"union": [], "intersect": []}
    for kind in ("union", "intersect"):
        spec = plan[kind]
        if spec is None:
            continue
        picked = [u for u in shared + unknown if rng.random() < 0.5]
        valid = build_subset(root / f"{kind}.npy", picked, spec["fault"], spec["seed"])
        sets[kind].append(set(valid))
        args += [f"--{kind}", str(root / f"{kind}.npy")]
        expects.add(SUBSET_EXPECT.get(spec["fault"] or "", "ok"))
        if spec["fault"]:
            damaged.append(f"subset_{spec['fault']}")
    metrics = {_rule(r)[0] for r in plan["rules"]}
    expects |= {s.expect(metrics) for s in sidecars}
    expect = "refuse" if "refuse" in expects else "fail" if "fail" in expects else "ok"
    inputs = [scores, *(root / f"{k}.npy" for k in ("union", "intersect") if plan[k])]
    digest = input_digest(inputs)
    run = invoke(*args)
    pool = sum(len(s.uids) for s in sidecars)
    tally = tally_select(pool, root / "out" / "subset.json")
    FIGURES.record_run("select", digest, damaged, run.crash, tally)

    assert run.crash is None, run.crash
    out = root / "out"
    if expect != "ok":
        assert run.exit_code == (2 if expect == "refuse" else 1), (expect, run.output, damaged)
        assert len(error_lines(run.output)) == 1, run.output
        assert not (out / "subset.npy").exists()
        return
    assert run.exit_code == 0, (run.output, damaged)
    selected, stages = reference_select(sidecars, plan["rules"])
    result = selected.union(*sets["union"])
    for other in sets["intersect"]:
        result &= other
    assert read_subset(out / "subset.npy") == sorted(result), damaged
    record = json.loads((out / "subset.json").read_text())
    assert record["pool"] == pool
    got = [{k: stage[k] for k in ("input", "count", "nan")} for stage in record["stages"]]
    assert got == stages, (got, stages, damaged)
    assert tally.lost == 0 and tally.read == pool
    assert unparseable_files(out) == [] and temp_files(out) == []


@SETTINGS
@given(plan=plans)
def test_select_over_damaged_sidecars_and_subsets(plan):
    with tempfile.TemporaryDirectory() as tmp:
        run_and_check(Path(tmp), plan)


@pytest.mark.parametrize("fault", sorted(SIDECAR_FAULTS))
def test_each_sidecar_fault(fault, tmp_path):
    plan = {
        "sidecars": [
            {"n": 9, "faults": [], "seed": 1},
            {"n": 12, "faults": [fault], "seed": 2},
        ],
        "rules": [f"{m}:0.5" for m in METRIC_COLUMNS],
        "union": None,
        "intersect": None,
    }
    run_and_check(tmp_path, plan)


@pytest.mark.parametrize("fault", SUBSET_FAULTS)
def test_each_subset_file_fault(fault, tmp_path):
    plan = {
        "sidecars": [{"n": 10, "faults": [], "seed": 1}],
        "rules": ["negclip:0.5"],
        "union": {"fault": fault, "seed": 3},
        "intersect": {"fault": None, "seed": 4},
    }
    run_and_check(tmp_path, plan)
    assert not Path(Evil.marker).exists(), "a subset file's pickle was executed"


def test_a_non_numeric_score_column_fails_in_one_line(tmp_path):
    plan = {
        "sidecars": [{"n": 8, "faults": ["string_scores"], "seed": 5}],
        "rules": [f"{m}:0.5" for m in METRIC_COLUMNS],
        "union": None,
        "intersect": None,
    }
    run_and_check(tmp_path, plan)


@pytest.mark.parametrize("fault", ["nan_scores", "truncated", "non_hex_uid"])
def test_subprocess_select_has_no_traceback_on_stderr(fault, tmp_path):
    scores = tmp_path / "scores"
    scores.mkdir()
    build_sidecar(scores, "a", 10, [], 1, [])
    build_sidecar(scores, "b", 10, [fault], 2, [])
    digest = input_digest([scores])
    proc = run_cli(
        "select",
        scores,
        "--out",
        tmp_path / "subset.npy",
        "--keep",
        "negclip:0.5",
        "--keep",
        "clipscore:0.5",
        "--keep",
        "normsim_inf:0.5",
    )
    crash = "Traceback in stderr" if "Traceback" in proc.stdout + proc.stderr else None
    tally = tally_select(20, tmp_path / "subset.json")
    FIGURES.record_run("select", digest, [fault], crash, tally)
    assert crash is None, proc.stderr
    expected = {"nan_scores": 0, "truncated": 2, "non_hex_uid": 1}[fault]
    assert proc.returncode == expected, proc.stdout + proc.stderr
    if expected:
        assert len([ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]) == 1
        assert not (tmp_path / "subset.npy").exists()
    else:
        read_subset(tmp_path / "subset.npy")
