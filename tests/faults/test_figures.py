"""The reliability figures count honestly: `lost` is always computed from the command's own
records (a silently dropped sample makes it non-zero), and a re-run is not a new case."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from faults.figures import (
    Figures,
    Tally,
    input_digest,
    tally_markers,
    tally_reshard,
    tally_select,
)
from faults.generator import build_shard, build_sidecar, build_stem, subset_pairs
from faults.harness import TINY, invoke

TESTS = Path(__file__).resolve().parents[1]
SUITES = [
    *(p for p in sorted((TESTS / "faults").glob("test_*.py")) if p.name != "test_figures.py"),
    TESTS / "test_kill_resume.py",
]


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (getattr(node.func, "attr", None) == name or getattr(node.func, "id", None) == name)
    ]


def _name(call: ast.Call) -> str:
    return getattr(call.func, "id", getattr(call.func, "attr", ""))


def test_every_suite_computes_lost_from_a_tally():
    """No suite passes `lost` (or a Tally it built itself): the figure is always a tally_*
    function's, which reads the command's records."""
    recorded = 0
    for path in SUITES:
        tree = ast.parse(path.read_text(), str(path))
        assert not _calls(tree, "Tally"), f"{path.name} builds a Tally by hand"
        tallied = {
            target.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and _name(node.value).startswith("tally")
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for call in _calls(tree, "record_run"):
            recorded += 1
            where = f"{path.name}:{call.lineno}"
            assert len(call.args) == 5 and not call.keywords, f"{where}: use the 5-argument form"
            tally = call.args[4]
            if isinstance(tally, ast.Name):
                assert tally.id in tallied, f"{where}: {tally.id} is not from a tally function"
                continue
            assert isinstance(tally, ast.Call), f"{where}: the tally must come from the records"
            assert _name(tally).startswith("tally"), f"{where}: {_name(tally)} is no tally"
    assert recorded >= 15
    with pytest.raises(TypeError):
        Tally(10, 10, 0, ())


def test_a_rerun_of_the_same_input_is_not_a_new_case(tmp_path):
    shard = build_shard(tmp_path / "src", "s", 1, 4, ["no_caption"])
    figures = Figures()
    empty = tally_markers(0, [])
    figures.record_run("embed", input_digest([shard.path]), shard.faults, None, empty)
    copy = tmp_path / "copy" / "s.tar"
    copy.parent.mkdir()
    shutil.copy(shard.path, copy)  # the same input elsewhere is the same input
    figures.record_run("embed", input_digest([copy]), shard.faults, None, empty)
    other = build_shard(tmp_path / "src", "t", 2, 4, [])
    figures.record_run("embed", input_digest([other.path]), [], None, empty)
    data = figures.as_dict()["by_command"]["embed"]
    assert (data["cases"], data["reruns"], data["damaged_inputs"]) == (2, 1, 1)


def _drop_third(real):
    """A reader that silently loses its third sample: the planted fault."""

    def reader(url):
        for i, sample in enumerate(real(url)):
            if i != 2:
                yield sample

    return reader


@pytest.mark.parametrize("plant", [False, True])
def test_embed_lost_becomes_non_zero_when_a_sample_is_silently_dropped(
    tmp_path, monkeypatch, plant
):
    import mmcurate.embed.stage as stage

    shard = build_shard(tmp_path / "src", "s", 1, 6, [])
    if plant:
        monkeypatch.setattr(stage, "iter_samples", _drop_third(stage.iter_samples))
    out = tmp_path / "store"
    run = invoke("embed", shard.path, "--out", out, "--model", TINY, "--decode-workers", "0")
    assert run.exit_code == 0, run.output
    tally = tally_markers(len(shard.samples), [out / "s.done.json"])
    assert tally.lost == int(plant)
    # The same loss planted in a temporary copy of the records of a clean run.
    if not plant:
        copy = tmp_path / "copy.done.json"
        marker = json.loads((out / "s.done.json").read_text())
        copy.write_text(json.dumps({**marker, "rows": marker["rows"] - 1}))
        assert tally_markers(len(shard.samples), [copy]).lost == 1


@pytest.mark.parametrize("plant", [False, True])
def test_score_lost_becomes_non_zero_when_a_row_is_silently_dropped(tmp_path, monkeypatch, plant):
    import mmcurate.curate.score_stage as stage

    stem = build_stem(tmp_path / "store", "s", 8, 8, [], 0)
    if plant:
        real = stage.valid_rows
        monkeypatch.setattr(stage, "valid_rows", lambda *a: (real(*a)[0][1:], real(*a)[1]))
    out = tmp_path / "scores"
    run = invoke("score", tmp_path / "store", "--out", out, "--batch-size", "4", "--k", "1")
    assert run.exit_code == 0, run.output
    assert tally_markers(len(stem.uids), [out / "s.done.json"]).lost == int(plant)


@pytest.mark.parametrize("plant", [False, True])
def test_select_lost_becomes_non_zero_when_a_row_is_silently_dropped(tmp_path, monkeypatch, plant):
    import mmcurate.curate.select as select

    scores = tmp_path / "scores"
    scores.mkdir()
    sidecars = [build_sidecar(scores, f"s{i}", 10, [], i, []) for i in range(2)]
    if plant:
        real = select.apply_rule

        def apply_rule(*args, **kwargs):
            keep, record = real(*args, **kwargs)
            keep = keep.copy()
            keep[np.flatnonzero(keep)[0]] = False  # dropped, but the record still counts it
            return keep, record

        monkeypatch.setattr(select, "apply_rule", apply_rule)
    out = tmp_path / "out" / "subset.npy"
    run = invoke("select", scores, "--out", out, "--keep", "negclip:0.5", "--keep", "clipscore>-9")
    assert run.exit_code == 0, run.output
    pool = sum(len(s.uids) for s in sidecars)
    assert tally_select(pool, out.with_suffix(".json")).lost == (2 if plant else 0)


@pytest.mark.parametrize("plant", [False, True])
def test_reshard_lost_becomes_non_zero_when_a_sample_is_silently_dropped(
    tmp_path, monkeypatch, plant
):
    import mmcurate.curate.reshard as reshard

    shards = [build_shard(tmp_path / "src", f"s{i}", i, 6, []) for i in range(2)]
    uids = sorted({s.uid(sh.stem) for sh in shards for s in sh.samples})
    np.save(tmp_path / "subset.npy", np.sort(subset_pairs(uids[::2])))
    if plant:
        monkeypatch.setattr(reshard, "iter_samples", _drop_third(reshard.iter_samples))
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    args = ["reshard", *(s.path for s in shards), "--subset", tmp_path / "subset.npy"]
    run = invoke(*args, "--out", out, "--json", summary)
    assert run.exit_code == 0, run.output
    read = sum(len(s.samples) for s in shards)
    assert tally_reshard(read, summary).lost == (2 if plant else 0)
