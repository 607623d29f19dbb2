"""DataComp drop-in: `select` on a DataComp metadata directory with its precomputed CLIP score
columns, and `--ties datacomp` against an independent re-implementation of DataComp's rule."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from mmcurate.cli.main import cli
from mmcurate.curate.select import SelectConfig, select
from mmcurate.data.uid import pair_to_uid

L14 = "clip_l14_similarity_score"
B32 = "clip_b32_similarity_score"


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def datacomp_dir(
    root: Path,
    sizes: list[int],
    seed: int = 0,
    decimals: int | None = None,
    nan: int = 0,
    dtype: str = "float64",
) -> Path:
    """DataComp's metadata layout: `<stem>.parquet` (uid, url, text, sizes, both CLIP scores,
    sha256) and `<stem>.npz` (l14_img, l14_txt, float16); no done markers."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(sizes):
        stem = f"{i:08d}"
        scores = {}
        for name in (L14, B32):
            values = rng.normal(0.3, 0.05, n)
            if decimals is not None:
                values = np.round(values, decimals)
            if nan and name == L14:
                values[rng.choice(n, min(nan, n), replace=False)] = np.nan
            scores[name] = pa.array(values.astype(dtype))
        table = pa.table(
            {
                "uid": [rng.bytes(16).hex() for _ in range(n)],
                "url": [f"https://example.com/{stem}/{j}.jpg" for j in range(n)],
                "text": [f"caption {j}" for j in range(n)],
                "original_width": pa.array(rng.integers(64, 1024, n), pa.int64()),
                "original_height": pa.array(rng.integers(64, 1024, n), pa.int64()),
                **scores,
                "sha256": [rng.bytes(32).hex() for _ in range(n)],
            }
        )
        pq.write_table(table, root / f"{stem}.parquet")
        np.savez(root / f"{stem}.npz", l14_img=unit(rng, n, 16), l14_txt=unit(rng, n, 16))
    return root


def datacomp_rule(metadata_dir: Path, key: str, fraction: float) -> set[str]:
    """DataComp's `load_uids_with_clip_score` re-implemented from its baselines code, with
    pandas: every row counts in N, threshold = -np.sort(-v)[int(N * f)], keep v >= it."""
    paths = sorted(str(p) for p in metadata_dir.iterdir() if ".parquet" in p.name)
    df = pd.concat([pd.read_parquet(p, columns=[key]) for p in paths])
    n = int(len(df) * fraction)
    threshold = -np.sort(-df[key].values)[n]
    kept: set[str] = set()
    for path in paths:
        part = pd.read_parquet(path, columns=["uid", key])
        kept.update(part[part[key] >= threshold]["uid"].values.tolist())
    return kept


def exact_rule(metadata_dir: Path, key: str, fraction: float) -> set[str]:
    """mmcurate's default: floor(f·N) best non-NaN rows, ties to the smaller uid (plain sort)."""
    paths = sorted(metadata_dir.glob("*.parquet"))
    df = pd.concat(pd.read_parquet(p, columns=["uid", key]) for p in paths)
    k = math.floor(Fraction(str(fraction)) * len(df))
    rows = sorted((-v, u) for u, v in zip(df["uid"], df[key]) if not math.isnan(v))
    return {u for _, u in rows[:k]}


def uids_of(subset: np.ndarray) -> set[str]:
    return {pair_to_uid(int(a), int(b)) for a, b in zip(subset["f0"], subset["f1"])}


def pick(root: Path, *rules: str, ties: str = "exact"):
    return select(root, SelectConfig(keep=rules, ties=ties), progress=False)


@pytest.mark.parametrize("decimals", [2, 3, None])
@pytest.mark.parametrize("fraction", [0.3, 0.1, 0.29, 0.5])
def test_ties_datacomp_matches_datacomps_rule(tmp_path, decimals, fraction):
    root = datacomp_dir(tmp_path / "meta", [4000, 3500, 2500], seed=1, decimals=decimals, nan=40)
    subset, report = pick(root, f"{L14}:{fraction}", ties="datacomp")
    expected = datacomp_rule(root, L14, fraction)
    assert uids_of(subset) == expected
    stage = report["stages"][0]
    assert stage["index"] == int(10_000 * fraction) and stage["nan"] == 3 * 40
    assert stage["count"] == len(expected)
    # The default keeps exactly floor(f·N), ties broken by uid; DataComp's keeps more.
    default, _ = pick(root, f"{L14}:{fraction}")
    assert uids_of(default) == exact_rule(root, L14, fraction)
    assert len(default) == math.floor(Fraction(str(fraction)) * 10_000)
    if decimals is None:  # no ties: DataComp keeps the row at the index too
        assert len(expected) == int(10_000 * fraction) + 1
    if decimals == 2:  # many rows tie at 2 decimals, and DataComp keeps them all
        assert len(expected) - len(default) > 20


def test_ties_datacomp_compares_float64_scores_at_their_precision(tmp_path):
    """Scores that differ only below float32 precision: read as float32 they would tie."""
    root = tmp_path / "meta"
    root.mkdir()
    base = np.repeat(np.linspace(0.2, 0.4, 50), 20)
    values = base + np.tile(np.arange(20) * 1e-12, 50)
    assert len(np.unique(values.astype(np.float32))) == 50
    table = pa.table({"uid": [f"{i:032x}" for i in range(1000)], L14: values})
    pq.write_table(table, root / "00000000.parquet")
    for fraction in (0.3, 0.123, 0.5):
        subset, _ = pick(root, f"{L14}:{fraction}", ties="datacomp")
        assert uids_of(subset) == datacomp_rule(root, L14, fraction)
        assert len(subset) == int(1000 * fraction) + 1  # no ties at float64 precision
    threshold, _ = pick(root, f"{L14}>=0.3")
    assert uids_of(threshold) == {f"{i:032x}" for i in np.flatnonzero(values >= 0.3)}


def test_datacomp_index_past_the_scored_rows_keeps_every_scored_row(tmp_path):
    """f = 1 (DataComp: IndexError) or an index into the NaN rows (DataComp: NaN threshold,
    nothing kept): mmcurate keeps every scored row and records no threshold."""
    root = datacomp_dir(tmp_path / "meta", [100], seed=3, nan=30)
    df = pd.read_parquet(root / "00000000.parquet")
    scored = set(df["uid"][df[L14].notna()])
    for fraction in ("1", "0.8"):
        subset, report = pick(root, f"{L14}:{fraction}", ties="datacomp")
        assert uids_of(subset) == scored
        assert report["stages"][0]["threshold"] is None


def test_chained_and_threshold_rules_on_datacomp_columns(tmp_path):
    root = datacomp_dir(tmp_path / "meta", [700, 300], seed=2, decimals=3)
    df = pd.concat(pd.read_parquet(p) for p in sorted(root.glob("*.parquet")))
    subset, report = pick(root, f"{B32}>=0.28", f"{L14}:0.3")
    alive = df[df[B32] >= 0.28]
    ranked = sorted(zip(-alive[L14], alive["uid"]))[:300]
    assert uids_of(subset) == {u for _, u in ranked}
    assert report["source"] == "metadata" and report["pool"] == 1000
    chained, _ = pick(root, f"{L14}:0.5", f"{B32}:0.2", ties="datacomp")
    first = df[df[L14] >= -np.sort(-df[L14].values)[500]]
    second = first[first[B32] >= -np.sort(-first[B32].values)[200]]
    assert uids_of(chained) == set(second["uid"])


def test_select_reads_only_uid_and_the_named_columns(tmp_path, monkeypatch):
    root = datacomp_dir(tmp_path / "meta", [200, 100], seed=4)
    asked: list[tuple[str, ...]] = []
    real = pq.read_table

    def spy(source, *args, columns=None, **kwargs):
        asked.append(tuple(columns) if columns is not None else ("<all>",))
        return real(source, *args, columns=columns, **kwargs)

    monkeypatch.setattr(pq, "read_table", spy)
    pick(root, f"{L14}:0.3", ties="datacomp")
    assert asked and set(asked) <= {(L14,), ("uid",)}


def test_cli_on_a_datacomp_directory_without_key_flags(tmp_path):
    """The issue's scenario: DataComp layout, no done markers, no key flags: `score` runs,
    and `select --keep clip_l14_similarity_score:0.3 --ties datacomp` gives DataComp's uids."""
    root = datacomp_dir(tmp_path / "meta", [300, 200], seed=5, decimals=2)
    runner = CliRunner()
    scored = runner.invoke(
        cli, ["score", str(root), "--out", str(tmp_path / "scores"), "--batch-size", "64"]
    )
    assert scored.exit_code == 0, scored.output
    assert sorted(p.name for p in (tmp_path / "scores").glob("*.scores.parquet")) == [
        "00000000.scores.parquet",
        "00000001.scores.parquet",
    ]
    out = tmp_path / "subset.npy"
    args = ["select", str(root), "--out", str(out), "--keep", f"{L14}:0.3", "--ties", "datacomp"]
    result = runner.invoke(cli, [*args, "--json", str(tmp_path / "summary.json")])
    assert result.exit_code == 0, result.output
    assert uids_of(np.load(out, allow_pickle=False)) == datacomp_rule(root, L14, 0.3)
    assert "500 rows in 2 metadata files" in result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ties"] == "datacomp" and summary["stages"][0]["index"] == 150


def test_a_column_that_does_not_exist_lists_the_columns_that_do(tmp_path):
    root = datacomp_dir(tmp_path / "meta", [50], seed=6)
    out = tmp_path / "subset.npy"
    result = CliRunner().invoke(
        cli, ["select", str(root), "--out", str(out), "--keep", "clip_l14_score:0.3"]
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert "no column 'clip_l14_score'" in lines[0]
    for column in ("original_width", "original_height", B32, L14):
        assert column in lines[0]
    assert "run `mmcurate score`" in lines[0]
    assert not out.exists()


def test_bad_ties_value_is_refused(tmp_path):
    root = datacomp_dir(tmp_path / "meta", [20], seed=7)
    result = CliRunner().invoke(
        cli, ["select", str(root), "--out", str(tmp_path / "s.npy"), "--ties", "loose"]
    )
    assert result.exit_code == 2 and "loose" in result.output
