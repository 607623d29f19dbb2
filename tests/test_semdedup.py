"""SemDeDup (issue 14): values against a float64 brute force, planted duplicates, determinism
over workers, resume, exact tiling, and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import meta_table

from mmcurate.curate.dedup_plan import DedupConfig
from mmcurate.curate.dedup_stage import run_semdedup, semdedup_values
from mmcurate.curate.semdedup import earlier_max, member_order, unit_rows
from mmcurate.curate.validity import valid_rows
from mmcurate.data.skips import DUPLICATE_UID, NONFINITE_EMBEDDING
from mmcurate.data.store import write_stem
from mmcurate.engine import LocalExecutor
from mmcurate.errors import ShardError, UsageError

ONE = LocalExecutor(1, 1)


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def planted(rng: np.random.Generator, n: int, d: int, groups: int, sigma: float = 0.1):
    """n random unit vectors, then `groups` originals each followed by 1-4 near copies, shuffled.
    Returns the rows (float64) and, per row, its group id (-1 for the random rows)."""
    rows, group = [unit(rng, n, d)], [np.full(n, -1)]
    for g in range(groups):
        base = unit(rng, 1, d)
        copies = base + sigma * rng.standard_normal((int(rng.integers(1, 5)), d)) / math.sqrt(d)
        members = np.vstack([base, copies / np.linalg.norm(copies, axis=1, keepdims=True)])
        rows.append(members)
        group.append(np.full(len(members), g))
    x, group = np.vstack(rows), np.concatenate(group)
    perm = rng.permutation(len(x))
    return x[perm], group[perm]


def write_store(root: Path, x: np.ndarray, sizes: list[int], txt: np.ndarray | None = None):
    """Stems of the given sizes holding consecutive rows of x (float16); returns the stems."""
    stems, start = [], 0
    for i, size in enumerate(sizes):
        stem = f"{i:05d}"
        arrays = {"img": x[start : start + size].astype(np.float16)}
        arrays["txt"] = (txt if txt is not None else x)[start : start + size].astype(np.float16)
        write_stem(root, stem, meta_table(stem, size), arrays, {})
        stems.append(stem)
        start += size
    return stems


def store_rows(store: Path, stems: list[str], keys=("img",)):
    """The scored rows of a store as the score stage sees them: float64 unit rows and uids."""
    import pyarrow.parquet as pq

    xs, uids = [], []
    for stem in stems:
        with np.load(store / f"{stem}.npz") as npz:
            arrays = [npz[k] for k in keys]
        ids = pq.read_table(store / f"{stem}.parquet").column("uid").to_pylist()
        valid, _ = valid_rows(ids, arrays)
        x = arrays[0][valid].astype(np.float64)
        xs.append(x / np.linalg.norm(x, axis=1, keepdims=True))
        uids += [ids[i] for i in valid]
    return np.vstack(xs), uids


def stage_values(work: Path, stems: list[str], key: str) -> np.ndarray:
    return np.concatenate([semdedup_values(work, s, key) for s in stems])


def checked_clusters(work: Path, stems: list[str], x: np.ndarray):
    """The stage's clusters and cosines to the centroid, each checked independently: every row
    sits at a nearest centroid, and its recorded cosine is that centroid's."""
    cluster = np.concatenate([np.load(work / "assign" / f"{s}.npz")["cluster"] for s in stems])
    cos = np.concatenate([np.load(work / "assign" / f"{s}.npz")["cos"] for s in stems])
    centroids = np.load(work / "centroids.npy").astype(np.float64)
    sims = x @ centroids.T
    mine = sims[np.arange(len(x)), cluster]
    assert np.all(mine >= sims.max(axis=1) - 1e-5)
    np.testing.assert_allclose(cos, mine, atol=1e-6)
    return cluster, cos


def brute_force(x: np.ndarray, cluster: np.ndarray, cos: np.ndarray, uids: list, keep: str):
    """SemDeDup by definition in float64: order each cluster by (cosine, uid), ascending for
    hard and by descending cosine for easy; the largest cosine to any earlier member."""
    values = np.empty(len(x))
    sign = 1.0 if keep == "hard" else -1.0
    for c in np.unique(cluster):
        members = sorted(np.flatnonzero(cluster == c), key=lambda i: (sign * cos[i], uids[i]))
        s = x[members] @ x[members].T
        for pos, i in enumerate(members):
            values[i] = -1.0 if pos == 0 else s[:pos, pos].max()
    return values


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("keep", ["hard", "easy"])
def test_values_equal_brute_force(tmp_path, keep):
    x, _ = planted(np.random.default_rng(0), 4600, 24, 120)
    stems = write_store(tmp_path / "store", x, [1500, 1200, 2000, len(x) - 4700])
    summary = run_semdedup(
        str(tmp_path / "store"), str(tmp_path / "work"), ["img"], DedupConfig(keep=keep), ONE
    )
    rows, uids = store_rows(tmp_path / "store", stems)
    assert summary["rows"] == len(rows) == len(x) and summary["clusters"] == round(len(x) ** 0.5)
    cluster, cos = checked_clusters(tmp_path / "work", stems, rows)
    values = stage_values(tmp_path / "work", stems, summary["key"])
    expected = brute_force(rows, cluster, cos, uids, keep)
    np.testing.assert_allclose(values, expected, atol=1e-6, rtol=0)
    assert values.dtype == np.float32 and not np.isnan(values).any()
    assert (values == -1.0).sum() == len(np.unique(cluster)) == summary["clusters_nonempty"]


def test_one_cluster_is_sequential_dedup_over_the_pool(tmp_path):
    x, _ = planted(np.random.default_rng(1), 2500, 16, 60)
    stems = write_store(tmp_path / "store", x, [1000, len(x) - 1000])
    summary = run_semdedup(
        str(tmp_path / "store"), str(tmp_path / "work"), ["img"], DedupConfig(clusters=1), ONE
    )
    rows, uids = store_rows(tmp_path / "store", stems)
    mean = rows.mean(axis=0)
    cos = np.concatenate([np.load(tmp_path / "work/assign" / f"{s}.npz")["cos"] for s in stems])
    np.testing.assert_allclose(cos, rows @ (mean / np.linalg.norm(mean)), atol=1e-5)
    order = sorted(range(len(rows)), key=lambda i: (cos[i], uids[i]))
    expected = np.empty(len(rows))
    seen = rows[order] @ rows[order].T
    for pos, i in enumerate(order):
        expected[i] = -1.0 if pos == 0 else seen[:pos, pos].max()
    values = stage_values(tmp_path / "work", stems, summary["key"])
    np.testing.assert_allclose(values, expected, atol=1e-6, rtol=0)


def test_planted_copies_are_removed_at_095_and_nothing_else(tmp_path):
    x, group = planted(np.random.default_rng(2), 3000, 64, 150)
    pairs = [x[group == g] @ x[group == g].T for g in range(150)]
    assert min(p.min() for p in pairs) >= 0.98  # every pair of a group is a near copy
    stems = write_store(tmp_path / "store", x, [1200, 1200, len(x) - 2400])
    summary = run_semdedup(
        str(tmp_path / "store"), str(tmp_path / "work"), ["img"], DedupConfig(), ONE
    )
    removed = stage_values(tmp_path / "work", stems, summary["key"]) > 0.95
    extras = sum(int((group == g).sum()) - 1 for g in range(150))
    removed_per_group = [int(removed[group == g].sum()) for g in range(150)]
    assert sum(removed_per_group) >= 0.95 * extras
    assert all(r < (group == g).sum() for g, r in enumerate(removed_per_group))  # one stays
    assert removed[group == -1].mean() <= 0.01


def test_random_order_follows_the_members_and_the_seed_not_the_store_order():
    rng = np.random.default_rng(3)
    uids = np.array([f"{u:032x}".encode() for u in rng.integers(0, 2**62, 50)])
    cos, ids = rng.random(50), np.arange(50)
    order = member_order(cos, uids, ids, "random", (0, 7))
    assert sorted(order) == list(range(50))
    perm = rng.permutation(50)
    shuffled = member_order(cos[perm], uids[perm], ids, "random", (0, 7))
    assert list(uids[perm][shuffled]) == list(uids[order])
    assert list(member_order(cos, uids, ids, "random", (1, 7))) != list(order)
    tied = member_order(np.zeros(50), uids, ids, "hard", (0, 0))
    assert list(uids[tied]) == sorted(uids)  # equal cosines: the smaller uid first


# --------------------------------------------------------------------------- determinism, resume


def test_tiles_give_exactly_the_values_of_one_block():
    rng = np.random.default_rng(4)
    x, _ = planted(rng, 500, 32, 40, sigma=0.02)
    x = np.vstack([x, x[:30], x[100:110]])  # exact copies: ties
    x = unit_rows(x[rng.permutation(len(x))].astype(np.float16))
    whole = earlier_max(x, block=len(x))
    for block in (256, 100, 37, 5):
        assert earlier_max(x, block=block).tobytes() == whole.tobytes()
    s = x.astype(np.float64) @ x.astype(np.float64).T
    expected = np.r_[-1.0, [s[:j, j].max() for j in range(1, len(x))]]
    np.testing.assert_allclose(whole, expected, atol=1e-6, rtol=0)


def test_near_ties_get_the_exact_maximum_whatever_the_tiles():
    """Rows so alike that float32 matmul rounding picks the wrong partner: every value is still
    the correctly rounded maximum (math.fsum over exact float64 products), for any block."""
    rng = np.random.default_rng(10)
    x = unit_rows(rng.standard_normal(256) + 1e-3 * rng.standard_normal((300, 256)))
    x64 = x.astype(np.float64)
    expected = [-1.0]
    for j in range(1, len(x)):
        expected.append(max(math.fsum(x64[i] * x64[j]) for i in range(j)))
    expected = np.array(expected, dtype=np.float32)
    for block in (300, 64, 7):
        np.testing.assert_array_equal(earlier_max(x, block=block), expected)


def test_stage_block_size_does_not_change_a_byte(tmp_path):
    x, _ = planted(np.random.default_rng(5), 1500, 16, 40)
    stems = write_store(tmp_path / "store", x, [800, len(x) - 800])
    outs = []
    for block in (10_000, 64):  # one block for the whole pool, then tiles
        work = tmp_path / f"work{block}"
        config = DedupConfig(clusters=1, block=block)
        run_semdedup(str(tmp_path / "store"), str(work), ["img"], config, ONE)
        outs.append([(work / "values" / f"{s}.npy").read_bytes() for s in stems])
    assert outs[0] == outs[1]


def all_bytes(work: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(work)): p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()
    }


def test_one_or_two_workers_give_identical_files_per_seed(tmp_path):
    x, _ = planted(np.random.default_rng(6), 1800, 16, 50)
    write_store(tmp_path / "store", x, [500, 500, 500, len(x) - 1500])
    runs = {}
    for workers, seed in ((1, 0), (2, 0), (1, 1)):
        work = tmp_path / f"w{workers}s{seed}"
        config = DedupConfig(seed=seed, task_rows=300)
        summary = run_semdedup(
            str(tmp_path / "store"), str(work), ["img"], config, LocalExecutor(workers, 1)
        )
        assert summary["failed"] == {} and summary["tasks"] > 2
        runs[workers, seed] = all_bytes(work)
    assert runs[1, 0] == runs[2, 0]
    assert runs[1, 0]["centroids.npy"] != runs[1, 1]["centroids.npy"]


def test_resume_redoes_only_what_was_deleted_with_identical_bytes(tmp_path):
    x, _ = planted(np.random.default_rng(7), 1600, 16, 40)
    write_store(tmp_path / "store", x, [400, 400, 400, len(x) - 1200])
    store, work = str(tmp_path / "store"), tmp_path / "work"
    config = DedupConfig(task_rows=300)
    first = run_semdedup(store, str(work), ["img"], config, ONE)
    before = all_bytes(work)
    stamps = {p: (work / p).stat().st_mtime_ns for p in before}
    task = sorted((work / "clusters").glob("*.npy"))[1].stem
    deleted = ["values/00001.npy", f"clusters/{task}.npy", "assign/00002.npz"]
    for name in deleted:
        (work / name).unlink()
    again = run_semdedup(store, str(work), ["img"], config, ONE)
    assert again["work"] == {"kmeans": [], "assign": ["00002"], "clusters": [task]}
    assert again["done"] == ["00001"] and again["key"] == first["key"]
    assert all_bytes(work) == before
    rewritten = {"values/00001.json", "assign/00002.json", f"clusters/{task}.json", *deleted}
    assert all((work / p).stat().st_mtime_ns == stamps[p] for p in before if p not in rewritten)
    easy = run_semdedup(store, str(work), ["img"], DedupConfig(task_rows=300, keep="easy"), ONE)
    assert easy["work"]["kmeans"] == [] and easy["work"]["assign"] == []
    assert len(easy["work"]["clusters"]) == easy["tasks"] and easy["key"] != first["key"]
    with pytest.raises(ShardError):
        semdedup_values(work, "00001", first["key"])


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (DedupConfig(clusters=0), "--clusters must be >= 1, got 0"),
        (DedupConfig(clusters=301), "--clusters 301 is more than the 300 rows to deduplicate"),
        (DedupConfig(keep="first"), "--dedup-keep must be one of hard, easy, random"),
        (DedupConfig(clusters=50, train=20), "--dedup-train 20 must be at least --clusters 50"),
    ],
)
def test_bad_options_are_refused_before_any_work(tmp_path, config, message):
    x = unit(np.random.default_rng(8), 300, 8)
    write_store(tmp_path / "store", x, [300])
    with pytest.raises(UsageError) as err:
        run_semdedup(str(tmp_path / "store"), str(tmp_path / "work"), ["img"], config, ONE)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not (tmp_path / "work").exists()


def test_a_store_with_no_scored_rows_gets_empty_values(tmp_path):
    x = np.full((20, 8), np.nan)
    stems = write_store(tmp_path / "store", x, [20])
    summary = run_semdedup(
        str(tmp_path / "store"), str(tmp_path / "work"), ["img"], DedupConfig(), ONE
    )
    assert summary["rows"] == 0 and summary["skipped"] == {NONFINITE_EMBEDDING: 20}
    assert semdedup_values(tmp_path / "work", stems[0], summary["key"]).shape == (0,)
    with pytest.raises(UsageError, match="--clusters 1 is more than the 0 rows"):
        run_semdedup(
            str(tmp_path / "store"), str(tmp_path / "w2"), ["img"], DedupConfig(clusters=1), ONE
        )


def test_nan_rows_are_skipped_and_counted_like_the_score_stage(tmp_path):
    rng = np.random.default_rng(9)
    x, _ = planted(rng, 700, 16, 30)
    txt = x.copy()
    x[[3, 50, 420]] = np.nan
    txt[[7, 600]] = np.inf  # only rows whose text counts are skipped for these
    stems = write_store(tmp_path / "store", x, [400, len(x) - 400], txt=txt)
    meta = pa.table({"uid": ["u"] * 2, "key": ["a", "b"], "caption": ["c"] * 2})
    write_stem(tmp_path / "store", "00002", meta, {"img": x[:2], "txt": x[:2]}, {})
    stems.append("00002")  # a repeated uid within a stem
    for keys, nonfinite in ((["img"], 3), (["img", "txt"], 5)):
        work = tmp_path / "-".join(keys)
        config = DedupConfig(clusters=1)
        summary = run_semdedup(str(tmp_path / "store"), str(work), keys, config, ONE)
        assert summary["skipped"] == {DUPLICATE_UID: 1, NONFINITE_EMBEDDING: nonfinite}
        rows, uids = store_rows(tmp_path / "store", stems, keys)
        assert summary["rows"] == len(rows) == len(x) + 2 - nonfinite - 1
        cluster, cos = checked_clusters(work, stems, rows)
        values = stage_values(work, stems, summary["key"])
        np.testing.assert_allclose(
            values, brute_force(rows, cluster, cos, uids, "hard"), atol=1e-6, rtol=0
        )
