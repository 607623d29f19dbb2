"""`score --metric semdedup` (issue 14): the column in the same sidecars as the other scores,
equal to SemDeDup by definition, composing with negclip in one select, resumed and rescored
when its options change, and its bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from click.testing import CliRunner
from test_semdedup import brute_force, checked_clusters, planted, store_rows, write_store

from mmcurate.cli.main import Group
from mmcurate.cli.score_cmd import score
from mmcurate.cli.select_cmd import select_cmd
from mmcurate.data.skips import NONFINITE_EMBEDDING

CLI = Group(name="mmcurate", commands={"score": score, "select": select_cmd})


def run_cli(*args) -> object:
    return CliRunner().invoke(CLI, list(map(str, args)))


def sidecars(out: Path, stems: list[str]) -> dict[str, np.ndarray]:
    tables = [pq.read_table(out / f"{s}.scores.parquet") for s in stems]
    return {
        name: np.concatenate([t.column(name).to_numpy() for t in tables])
        for name in tables[0].column_names
        if name != "uid"
    } | {"uid": np.concatenate([t.column("uid").to_numpy(zero_copy_only=False) for t in tables])}


def test_semdedup_column_is_semdedup_by_definition_beside_negclip(tmp_path):
    x, group = planted(np.random.default_rng(21), 600, 16, 40)
    x[[5, 77]] = np.nan
    stems = write_store(tmp_path / "store", x, [300, len(x) - 300])
    out = tmp_path / "scores"
    common = ("--metric", "negclip", "--metric", "semdedup", "--clusters", 6, "--batch-size", 64)
    result = run_cli("score", tmp_path / "store", "--out", out, *common, "--json", tmp_path / "s")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "s").read_text())
    assert summary["metrics"] == ["negclip", "semdedup"]
    assert summary["skipped"] == {NONFINITE_EMBEDDING: 2}
    assert summary["semdedup"]["clusters"] == 6 and "semdedup: 6 clusters" in result.output
    got = sidecars(out, stems)
    rows, uids = store_rows(tmp_path / "store", stems, ("img", "txt"))
    assert list(got["uid"]) == uids
    cluster, cos = checked_clusters(out / ".semdedup", stems, rows)
    expected = brute_force(rows, cluster, cos, uids, "hard")
    np.testing.assert_allclose(got["semdedup"], expected, atol=1e-6, rtol=0)
    assert np.isfinite(got["negclip"]).all()

    again = run_cli("score", tmp_path / "store", "--out", out, *common, "--json", tmp_path / "s2")
    assert again.exit_code == 0 and json.loads((tmp_path / "s2").read_text())["done"] == []
    assert sidecars(out, stems)["semdedup"].tobytes() == got["semdedup"].tobytes()

    easy = run_cli("score", tmp_path / "store", "--out", out, *common, "--dedup-keep", "easy")
    assert easy.exit_code == 0, easy.output
    rescored = sidecars(out, stems)["semdedup"]
    np.testing.assert_allclose(
        rescored, brute_force(rows, cluster, cos, uids, "easy"), atol=1e-6, rtol=0
    )
    assert not np.array_equal(rescored, got["semdedup"])


def test_select_on_semdedup_removes_planted_copies_and_composes_with_negclip(tmp_path):
    x, group = planted(np.random.default_rng(22), 500, 16, 50, sigma=0.05)
    stems = write_store(tmp_path / "store", x, [len(x)])
    out = tmp_path / "scores"
    result = run_cli(
        "score",
        tmp_path / "store",
        "--out",
        out,
        "--metric",
        "negclip",
        "--metric",
        "semdedup",
        "--batch-size",
        128,
    )
    assert result.exit_code == 0, result.output
    keep = run_cli("select", out, "--out", tmp_path / "subset.npy", "--keep", "semdedup<=0.95")
    assert keep.exit_code == 0, keep.output
    got = sidecars(out, stems)
    kept = set(got["uid"][got["semdedup"] <= 0.95])
    _, uids = store_rows(tmp_path / "store", stems, ("img", "txt"))
    copies = 0
    for g in range(50):
        members = [uids[i] for i in np.flatnonzero(group == g)]
        assert sum(u in kept for u in members) == 1
        copies += len(members) - 1
    assert sum(uids[i] in kept for i in np.flatnonzero(group == -1)) >= 0.99 * 500
    both = run_cli(
        "select",
        out,
        "--out",
        tmp_path / "both.npy",
        "--keep",
        "negclip:0.5",
        "--keep",
        "semdedup<=0.95",
    )
    assert both.exit_code == 0, both.output
    chosen = np.load(tmp_path / "both.npy")
    alone = np.load(tmp_path / "subset.npy")
    assert 0 < len(chosen) < len(alone) == len(x) - copies


def test_bad_cluster_counts_exit_2_in_one_line(tmp_path):
    x = planted(np.random.default_rng(23), 100, 8, 0)[0]
    write_store(tmp_path / "store", x, [100])
    for clusters, message in (
        (0, "--clusters must be >= 1, got 0"),
        (101, "--clusters 101 is more than the 100 rows"),
    ):
        result = run_cli(
            "score",
            tmp_path / "store",
            "--out",
            tmp_path / "o",
            "--metric",
            "semdedup",
            "--clusters",
            clusters,
        )
        assert result.exit_code == 2
        assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not list((tmp_path / "o").glob("*.scores.parquet"))
