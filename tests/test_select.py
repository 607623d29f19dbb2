"""`mmcurate select`: chained fractions of the whole pool, thresholds, ties by uid, set algebra."""

from __future__ import annotations

import json
import math
import operator
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from mmcurate.cli.main import Group
from mmcurate.cli.select_cmd import reshard_cmd, select_cmd
from mmcurate.curate.normsim import normsim_d_keep
from mmcurate.curate.rules import parse_rule
from mmcurate.curate.select import SelectConfig, select
from mmcurate.data.atomic import save_npy_atomic
from mmcurate.data.subset import write_subset
from mmcurate.data.uid import (
    UID_DTYPE,
    hex_to_pairs,
    intersect_pairs,
    pair_to_uid,
    uid_pairs,
    union_pairs,
)
from mmcurate.errors import UsageError

CLI = Group("mmcurate", commands={"select": select_cmd, "reshard": reshard_cmd})
METRICS = ("clipscore", "negclip", "normsim_2", "normsim_inf")


def pick(root, rules=(), **options):
    """`select` with these --keep rules and options, as the CLI calls it."""
    opts = {k: tuple(map(str, v)) if isinstance(v, list) else v for k, v in options.items()}
    return select(root, SelectConfig(keep=tuple(rules), **opts), progress=False)


def random_uids(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [rng.bytes(16).hex() for _ in range(n)]


def write_sidecars(root: Path, uids: list[str], scores: dict[str, np.ndarray], files: int) -> None:
    """Split rows over `files` sidecars named by stem, as `mmcurate score` writes them."""
    root.mkdir(parents=True, exist_ok=True)
    for i, rows in enumerate(np.array_split(np.arange(len(uids)), files)):
        table = pa.table(
            {
                "uid": pa.array([uids[r] for r in rows], pa.string()),
                **{m: pa.array(v[rows], pa.float32()) for m, v in scores.items()},
            }
        )
        pq.write_table(table, root / f"{i:05d}.scores.parquet")


def reference(uids: list[str], scores: dict[str, np.ndarray], rules: list[str]) -> set[str]:
    """Plain-Python selection: sort by (-score, uid string) and cut; thresholds in float32."""
    n = len(uids)
    alive = list(range(n))
    for text in rules:
        for op in (">=", "<=", ">", "<", ":"):
            if op in text:
                metric, raw = text.split(op)
                break
        col = scores[metric]
        alive = [i for i in alive if not math.isnan(float(col[i]))]
        if op == ":":
            k = math.floor(Fraction(raw) * n)
            alive = sorted(alive, key=lambda i: (-float(col[i]), uids[i]))[:k]
        else:
            x = float(np.float32(float(raw)))
            test = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}[op]
            alive = [i for i in alive if test(float(col[i]), x)]
    return {uids[i] for i in alive}


def as_uids(subset: np.ndarray) -> list[str]:
    return [pair_to_uid(int(a), int(b)) for a, b in zip(subset["f0"], subset["f1"])]


def assert_subset_form(subset: np.ndarray) -> None:
    """DataComp subset form: (u8, u8), strictly increasing, so sorted and unique."""
    assert subset.dtype == np.dtype("u8,u8")
    keys = [(int(a), int(b)) for a, b in zip(subset["f0"], subset["f1"])]
    assert all(a < b for a, b in zip(keys, keys[1:]))


@pytest.fixture
def pool(tmp_path):
    """600 rows over 5 sidecars; scores on a coarse grid (many ties) and a few NaN."""
    rng = np.random.default_rng(7)
    n = 600
    uids = random_uids(n, 1)
    scores = {m: (rng.integers(0, 40, n) / 40).astype(np.float32) for m in METRICS}
    scores["negclip"][rng.choice(n, 15, replace=False)] = np.nan
    scores["normsim_inf"][rng.choice(n, 9, replace=False)] = np.nan
    write_sidecars(tmp_path / "scores", uids, scores, 5)
    return tmp_path / "scores", uids, scores


def test_hex_to_pairs_matches_uid_pairs_on_sliced_and_uppercase_columns():
    uids = random_uids(50, 3)
    column = pa.array([u.upper() if i % 3 == 0 else u for i, u in enumerate(uids)]).slice(7, 30)
    np.testing.assert_array_equal(hex_to_pairs(column), uid_pairs(uids[7:37]))
    with pytest.raises(ValueError):
        hex_to_pairs(pa.array(["z" * 32]))
    with pytest.raises(ValueError):
        hex_to_pairs(pa.array(["ab" * 15]))


def test_chained_fractions_are_of_the_whole_pool(pool):
    root, uids, scores = pool
    rules = ["negclip:0.3", "normsim_inf:0.2"]
    subset, report = pick(root, rules)
    assert set(as_uids(subset)) == reference(uids, scores, rules)
    assert [s["count"] for s in report["stages"]] == [180, 120]
    assert [s["target"] for s in report["stages"]] == [180, 120]
    assert report["stages"][0]["nan"] == 15
    assert report["stages"][1]["input"] == 180
    assert report["pool"] == 600 and report["count"] == 120
    assert_subset_form(subset)


def test_default_recipe_is_negclip_then_normsim_inf(pool):
    root, uids, scores = pool
    subset, report = pick(root, [])
    assert [s["rule"] for s in report["stages"]] == ["negclip:0.3", "normsim_inf:0.2"]
    assert set(as_uids(subset)) == reference(uids, scores, ["negclip:0.3", "normsim_inf:0.2"])


def test_fraction_larger_than_survivors_keeps_all_non_nan(pool):
    root, uids, scores = pool
    rules = ["clipscore>=0.9", "negclip:0.5"]
    subset, report = pick(root, rules)
    assert set(as_uids(subset)) == reference(uids, scores, rules)
    assert report["stages"][1]["count"] < report["stages"][1]["target"]


def test_fraction_is_exact_for_decimals(tmp_path):
    uids = random_uids(100, 4)
    write_sidecars(tmp_path, uids, {"negclip": np.arange(100, dtype=np.float32)}, 1)
    subset, _ = pick(tmp_path, ["negclip:0.29"])
    assert len(subset) == 29  # int(0.29 * 100) would give 28


@pytest.mark.parametrize(
    "rules",
    [
        ["clipscore>=0.5"],
        ["clipscore>0.5"],
        ["clipscore<=0.25", "negclip<0.7"],
        ["normsim_2>0.1", "negclip:0.4", "normsim_inf>=0.3"],
    ],
)
def test_thresholds_and_mixed_chains(pool, rules):
    root, uids, scores = pool
    subset, report = pick(root, rules)
    expected = reference(uids, scores, rules)
    assert set(as_uids(subset)) == expected
    assert report["count"] == len(expected)


def test_threshold_boundary_is_inclusive_only_for_ge(tmp_path):
    uids = random_uids(3, 5)
    write_sidecars(tmp_path, uids, {"clipscore": np.array([0.28, 0.2799, 0.3], np.float32)}, 1)
    assert set(as_uids(pick(tmp_path, ["clipscore>=0.28"])[0])) == {
        uids[0],
        uids[2],
    }
    assert set(as_uids(pick(tmp_path, ["clipscore>0.28"])[0])) == {uids[2]}


def test_ties_keep_the_smaller_uid(tmp_path):
    uids = random_uids(40, 6)
    values = np.full(40, 0.5, np.float32)
    values[:5] = 0.9
    write_sidecars(tmp_path, uids, {"negclip": values}, 3)
    subset, _ = pick(tmp_path, ["negclip:0.25"])
    winners = set(uids[:5]) | set(sorted(uids[5:])[:5])
    assert set(as_uids(subset)) == winners
    # A uid is compared as a number: hex order equals numeric order of the pair.
    assert sorted(uids) == as_uids(np.sort(uid_pairs(uids)))


def test_duplicate_uids_across_sidecars_give_a_unique_sorted_subset(tmp_path):
    uids = random_uids(30, 8)
    doubled = uids + uids[:10]
    values = np.concatenate([np.linspace(0, 1, 30), np.linspace(0, 1, 30)[:10]]).astype(np.float32)
    write_sidecars(tmp_path / "s", doubled, {"clipscore": values}, 4)
    subset, report = pick(tmp_path / "s", ["clipscore>=0"])
    assert sorted(as_uids(subset)) == sorted(uids)
    assert report["duplicate_uids"] == 10
    assert_subset_form(subset)


def test_union_and_intersect_match_python_sets(tmp_path, pool):
    root, uids, scores = pool
    rng = np.random.default_rng(11)
    a = list(rng.choice(uids, 100, replace=False)) + random_uids(20, 12)
    b = list(rng.choice(uids, 300, replace=False))
    save_npy_atomic(tmp_path / "a.npy", uid_pairs(a))  # unsorted on purpose
    save_npy_atomic(tmp_path / "b.npy", np.sort(uid_pairs(b)))
    rules = ["negclip:0.3"]
    ours = reference(uids, scores, rules)
    subset, report = pick(root, rules, union=[tmp_path / "a.npy"], intersect=[tmp_path / "b.npy"])
    assert set(as_uids(subset)) == (ours | set(a)) & set(b)
    assert report["after_union"] == len(ours | set(a))
    assert_subset_form(subset)
    only_files, _ = pick(None, union=[tmp_path / "a.npy", tmp_path / "b.npy"])
    assert set(as_uids(only_files)) == set(a) | set(b)
    assert_subset_form(only_files)


def test_set_helpers_against_python_sets():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 4, size=(300, 2)).astype(np.uint64)
    y = rng.integers(0, 4, size=(200, 2)).astype(np.uint64)
    px, py = x.view(UID_DTYPE).ravel(), y.view(UID_DTYPE).ravel()
    sx, sy = {tuple(r) for r in x.tolist()}, {tuple(r) for r in y.tolist()}
    assert [tuple(r) for r in union_pairs(px, py).tolist()] == sorted(sx | sy)
    assert [tuple(r) for r in intersect_pairs(px, py).tolist()] == sorted(sx & sy)


def test_cli_writes_npy_and_record(tmp_path, pool):
    root, uids, scores = pool
    out = tmp_path / "sel" / "subset.npy"
    result = CliRunner().invoke(
        CLI,
        [
            "select",
            str(root),
            "--out",
            str(out),
            "--keep",
            "negclip:0.3",
            "--keep",
            "clipscore>=0.5",
            "--json",
            str(tmp_path / "summary.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    loaded = np.load(out, allow_pickle=False)
    assert_subset_form(loaded)
    assert set(as_uids(loaded)) == reference(uids, scores, ["negclip:0.3", "clipscore>=0.5"])
    record = json.loads((tmp_path / "sel" / "subset.json").read_text())
    assert record["pool"] == 600 and record["count"] == len(loaded)
    first, second = record["stages"]
    assert (first["metric"], first["rule"], first["count"]) == ("negclip", "negclip:0.3", 180)
    assert (second["metric"], second["threshold"]) == ("clipscore", 0.5)
    assert "seed" in record
    assert json.loads((tmp_path / "summary.json").read_text())["count"] == len(loaded)


@pytest.mark.parametrize("rule", ["negclip:0", "negclip:1.5", "negclip:-0.1"])
def test_bad_fraction_is_refused_in_one_line_before_work(tmp_path, rule):
    out = tmp_path / "subset.npy"
    result = CliRunner().invoke(
        CLI, ["select", str(tmp_path / "no_such_scores"), "--out", str(out), "--keep", rule]
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "outside (0, 1]" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--keep", "bogus:0.2"], "no column 'bogus'"),
        (["--keep", "negclip~0.2"], "bad --keep rule"),
        (["--keep", "normsim_d>=0.2"], "takes a fraction"),
        (["--keep", "normsim_d:0.2"], "needs --store"),
        (["--union", "missing.npy"], "subset file not found"),
    ],
)
def test_bad_rules_and_inputs_are_usage_errors(pool, tmp_path, args, needle):
    root, _, _ = pool
    result = CliRunner().invoke(CLI, ["select", str(root), "--out", str(tmp_path / "o.npy"), *args])
    assert result.exit_code == 2
    assert result.output.strip().startswith("Error:") and needle in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_pickled_or_wrong_dtype_subset_files_are_refused(tmp_path, pool):
    root, _, _ = pool
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "f8.npy", np.zeros((3, 2)))
    for name in ("obj.npy", "f8.npy"):
        with pytest.raises(UsageError):
            pick(root, ["negclip:0.1"], union=[tmp_path / name])


def test_parse_rule_forms():
    assert parse_rule("negclip:0.3").fraction == Fraction(3, 10)
    rule = parse_rule("clipscore >= 0.28")
    assert (rule.metric, rule.op, rule.value) == ("clipscore", ">=", 0.28)
    for bad in ("negclip:nan", "clipscore>=inf", "uid:0.5", ":0.2", "negclip:abc"):
        with pytest.raises(UsageError):
            parse_rule(bad)


def test_million_rows_select_without_embeddings_in_modest_memory(tmp_path):
    """1M rows over 20 sidecars; no store exists at all, so no embedding can be read, and
    `mmcurate.data.store` is not even imported."""
    n, files = 1_000_000, 20
    rng = np.random.default_rng(0)
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    hexes = digits[rng.integers(0, 16, size=(n, 32), dtype=np.uint8)].view("S32").ravel()
    negclip = rng.standard_normal(n).astype(np.float32)
    normsim = rng.random(n, dtype=np.float32)
    root = tmp_path / "scores"
    root.mkdir()
    for i, rows in enumerate(np.array_split(np.arange(n), files)):
        table = pa.table(
            {
                "uid": pa.array(hexes[rows]).cast(pa.string()),
                "clipscore": pa.array(rng.random(len(rows), dtype=np.float32)),
                "negclip": pa.array(negclip[rows]),
                "normsim_2": pa.array(rng.random(len(rows), dtype=np.float32)),
                "normsim_inf": pa.array(normsim[rows]),
            }
        )
        pq.write_table(table, root / f"{i:05d}.scores.parquet")
    script = textwrap.dedent(
        f"""
        import json, sys, tracemalloc
        import pyarrow.parquet, tqdm
        from mmcurate.curate.select import SelectConfig, select
        from mmcurate.data.subset import write_subset
        def hwm():  # peak RSS of this process in MB (VmHWM restarts at exec, ru_maxrss does not)
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        # Warm up: the first parquet read maps Arrow's thread pools and allocator (~90 MB, fixed).
        pyarrow.parquet.read_table({str(root / "00000.scores.parquet")!r})
        base = hwm()
        tracemalloc.start()
        subset, report = select({str(root)!r}, SelectConfig(), progress=False)
        write_subset({str(tmp_path / "subset.npy")!r}, subset, report)
        traced = tracemalloc.get_traced_memory()[1]
        print(json.dumps({{"rss_mb": hwm() - base, "traced_mb": traced / 2**20,
                          "store_loaded": "mmcurate.data.store" in sys.modules,
                          "count": report["count"]}}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["count"] == 200_000
    assert not stats["store_loaded"]
    # uids and two score columns are 1M x (16 + 2 x 4) bytes = 24 MB if all held at once; select
    # holds one column and the survivors' uids, so its numpy peak stays under 24 B per row.
    # RSS also holds allocator slack and a fixed ~13 MB of Arrow read buffers (measured: 27 to
    # 41 B per row at 1M rows; 17 B per row between 1M and 2M rows).
    assert stats["traced_mb"] * 2**20 / n <= 24
    assert stats["rss_mb"] * 2**20 / n <= 48
    # The same selection computed independently with a full lexsort.
    pairs = hexes.astype(str)
    first = np.lexsort((pairs, -negclip))[:300_000]
    second = first[np.lexsort((pairs[first], -normsim[first]))[:200_000]]
    got = np.load(tmp_path / "subset.npy", allow_pickle=False)
    assert_subset_form(got)
    assert set(as_uids(got)) == set(pairs[second].tolist())


def _small_store(tmp_path: Path, n_stems: int = 3, per: int = 40, dim: int = 8):
    """A store with shuffled row order per stem, and sidecars in another order."""
    from mmcurate.data.store import write_stem

    rng = np.random.default_rng(3)
    store, scores_dir = tmp_path / "store", tmp_path / "scores"
    scores_dir.mkdir(parents=True)
    all_uids, emb, neg = [], [], []
    for s in range(n_stems):
        uids = random_uids(per, 100 + s)
        x = rng.standard_normal((per, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x = x.astype(np.float16)
        perm = rng.permutation(per)
        meta = pa.table({"uid": [uids[i] for i in perm], "key": [str(i) for i in perm]})
        write_stem(store, f"{s:05d}", meta, {"img": x[perm], "txt": x[perm]}, {})
        negclip = rng.random(per).astype(np.float32)
        pq.write_table(
            pa.table({"uid": uids, "negclip": negclip}), scores_dir / f"{s:05d}.scores.parquet"
        )
        all_uids += uids
        emb.append(x.astype(np.float32))
        neg.append(negclip)
    return store, scores_dir, all_uids, np.concatenate(emb), np.concatenate(neg)


def test_normsim_d_stage_reads_the_survivors_embeddings_from_the_store(tmp_path):
    store, scores_dir, uids, emb, neg = _small_store(tmp_path)
    n = len(uids)
    subset, report = pick(
        scores_dir, ["negclip:0.5", "normsim_d:0.2"], store=store, normsim_d_iters=7, seed=5
    )
    # Independent: survivors in sidecar order, embeddings from memory, one chunk.
    survivors = sorted(reference(uids, {"negclip": neg}, ["negclip:0.5"]), key=uids.index)
    rows = [uids.index(u) for u in survivors]
    mask = normsim_d_keep([emb[rows]], n // 5, num_iters=7, seed=5)
    assert set(as_uids(subset)) == {survivors[i] for i in np.flatnonzero(mask)}
    assert len(subset) == n // 5
    assert report["stages"][1]["kind"] == "normsim_d" and report["stages"][1]["seed"] == 5


def test_normsim_d_via_cli_and_missing_store_stem(tmp_path):
    store, scores_dir, uids, _, _ = _small_store(tmp_path)
    out = tmp_path / "subset.npy"
    args = ["select", str(scores_dir), "--out", str(out), "--keep", "normsim_d:0.25"]
    args += ["--store", str(store)]
    ok = CliRunner().invoke(CLI, [*args, "--normsim-d-iters", "3"])
    assert ok.exit_code == 0, ok.output
    assert len(np.load(out, allow_pickle=False)) == len(uids) // 4
    (scores_dir / "00000.scores.parquet").rename(scores_dir / "00099.scores.parquet")
    bad = CliRunner().invoke(CLI, args)
    assert bad.exit_code == 2 and "lacks stem(s)" in bad.output


def test_normsim_d_memory_budget_changes_reads_not_the_subset(tmp_path):
    """A budget below the pool makes NormSim-D re-read rows from the store on later passes;
    the subset is the one the default budget gives, and a size that is not one is refused."""
    store, scores_dir, _, _, _ = _small_store(tmp_path)
    args = ["select", str(scores_dir), "--keep", "normsim_d:0.25", "--store", str(store)]
    args += ["--normsim-d-iters", "20"]
    runs = {}
    for name, extra in {"default": [], "small": ["--normsim-d-memory", "0.5KiB"]}.items():
        out = tmp_path / f"{name}.npy"
        ok = CliRunner().invoke(CLI, [*args, "--out", str(out), *extra])
        assert ok.exit_code == 0, ok.output
        reads = json.loads(out.with_suffix(".json").read_text())["stages"][0]["reads"]
        runs[name] = (np.load(out, allow_pickle=False), reads)
    assert np.array_equal(runs["small"][0], runs["default"][0])
    assert runs["small"][1]["memory_bytes"] == 512
    assert runs["small"][1]["passes"] > runs["default"][1]["passes"]
    assert runs["small"][1]["bytes"] > runs["default"][1]["bytes"]
    bad = CliRunner().invoke(
        CLI, [*args, "--out", str(tmp_path / "x.npy"), "--normsim-d-memory", "lots"]
    )
    assert bad.exit_code == 2 and "--normsim-d-memory" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "text,expected", [("8GiB", 8 * 2**30), ("500MB", 5 * 10**8), ("1048576", 2**20), ("1.5k", None)]
)
def test_parse_memory(text, expected):
    from mmcurate.curate.normsim_d import parse_memory

    if expected is None:
        with pytest.raises(UsageError):
            parse_memory(text)
    else:
        assert parse_memory(text) == expected


def test_write_subset_refuses_wrong_dtype(tmp_path):
    with pytest.raises(ValueError):
        write_subset(tmp_path / "x.npy", np.zeros(3, dtype=np.uint64), {})


def test_score_columns_round_trip_into_select(tmp_path):
    """`score` with every metric and p writes columns (normsim_2.5 too) that `select` keeps by."""
    from mmcurate.cli.main import cli
    from mmcurate.data.store import write_stem

    rng = np.random.default_rng(9)

    def unit(n: int) -> np.ndarray:
        x = rng.standard_normal((n, 16))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)

    store, scores = tmp_path / "store", tmp_path / "scores"
    for s in range(2):
        uids = random_uids(30, 50 + s)
        meta = pa.table({"uid": uids, "key": [str(i) for i in range(30)]})
        write_stem(store, f"{s:05d}", meta, {"img": unit(30), "txt": unit(30)}, {})
    np.save(tmp_path / "target.npy", unit(5).astype(np.float32))
    args = ["score", str(store), "--out", str(scores), "--batch-size", "16"]
    for metric in ("clipscore", "negclip", "normsim"):
        args += ["--metric", metric]
    for p in ("2", "inf", "2.5", "3"):
        args += ["--p", p]
    scored = CliRunner().invoke(cli, [*args, "--target", str(tmp_path / "target.npy")])
    assert scored.exit_code == 0, scored.output
    table = pa.concat_tables(pq.read_table(p) for p in sorted(scores.glob("*.scores.parquet")))
    columns = [c for c in table.column_names if c != "uid"]
    assert set(columns) == {
        "clipscore",
        "negclip",
        "normsim_2",
        "normsim_inf",
        "normsim_2.5",
        "normsim_3",
    }
    uids = table.column("uid").to_pylist()
    for column in columns:
        values = {column: table.column(column).to_numpy()}
        middle = float(np.median(values[column]))
        for rule in (f"{column}:0.2", f"{column}>={middle}"):
            out = tmp_path / "subset.npy"
            result = CliRunner().invoke(
                cli, ["select", str(scores), "--out", str(out), "--keep", rule]
            )
            assert result.exit_code == 0, (rule, result.output)
            got = set(as_uids(np.load(out, allow_pickle=False)))
            assert got == reference(uids, values, [rule]), rule
            assert len(got) == (12 if ":" in rule else int((values[column] >= middle).sum()))
