"""The `score` stage and command end to end: sidecars read back with pyarrow, resume, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from conftest import meta_table

from mmcurate.cli.main import Group
from mmcurate.cli.score_cmd import score
from mmcurate.curate.score_config import ScoreConfig, resolve_score
from mmcurate.curate.score_stage import run_score
from mmcurate.curate.scores import negclip_scores
from mmcurate.curate.targets import load_target
from mmcurate.curate.windows import WindowRows, plan_windows, window_items
from mmcurate.data.store import write_stem
from mmcurate.engine import LocalExecutor
from mmcurate.errors import UsageError

CLI = Group(name="mmcurate", commands={"score": score})


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pairs(rng: np.random.Generator, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    img = unit(rng, n, d)
    txt = img + rng.uniform(0.2, 2.0, (n, 1)) * rng.standard_normal((n, d)) / math.sqrt(d)
    return img.astype(np.float16), (txt / np.linalg.norm(txt, axis=1, keepdims=True)).astype(
        np.float16
    )


def make_store(root: Path, sizes: list[int], d: int = 16, seed: int = 0, stats=None) -> dict:
    """A store of random unit pairs, one stem per size; returns {stem: (img, txt)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, n in enumerate(sizes):
        stem = f"{i:05d}"
        img, txt = pairs(rng, n, d)
        write_stem(root, stem, meta_table(stem, n), {"img": img, "txt": txt}, stats or {})
        out[stem] = (img, txt)
    return out


def run_cli(*args: str):
    return CliRunner().invoke(CLI, ["score", *map(str, args)])


def read_sidecar(out: Path, stem: str) -> pa.Table:
    return pq.read_table(out / f"{stem}.scores.parquet")


def test_plan_windows_groups_consecutive_stems():
    counts = [("a", 100), ("b", 100), ("c", 100), ("d", 30)]
    assert plan_windows(counts, 200, 64) == [["a", "b"], ["c", "d"]]
    assert plan_windows([("a", 250), ("b", 10)], 200, 64) == [["a", "b"]]
    assert plan_windows([("a", 250), ("b", 70)], 200, 64) == [["a"], ["b"]]
    assert plan_windows([("a", 5)], 200, 64) == [["a"]]


def test_window_rows_gathers_across_stems_in_request_order():
    a, b = np.arange(20, dtype=np.float16).reshape(10, 2), -np.ones((4, 2), np.float16)
    view = WindowRows([(a, np.array([1, 3, 4])), (b, np.array([0, 2]))], 2)
    assert len(view) == 5
    np.testing.assert_array_equal(view[np.array([4, 0, 2])], np.stack([b[2], a[1], a[4]]))
    np.testing.assert_array_equal(view[1:3], a[[3, 4]])


def test_score_end_to_end_matches_the_library(tmp_path):
    store, out = tmp_path / "store", tmp_path / "scores"
    data = make_store(store, [90, 80, 70, 30], d=16)
    rng = np.random.default_rng(9)
    targets = unit(rng, 300, 16).astype(np.float32)
    targets[:20] *= -1
    np.save(tmp_path / "target.npy", targets)
    json_path = tmp_path / "summary.json"
    result = run_cli(
        store, "--out", out, "--metric", "clipscore", "--metric", "negclip",
        "--metric", "normsim", "--target", tmp_path / "target.npy",
        "--p", "2", "--p", "inf", "--p", "3", "--batch-size", "64", "--k", "3",
        "--window", "150", "--seed", "11", "--temperature", "0.05", "--json", json_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "τ=0.05 (--temperature)" in result.output
    summary = json.loads(json_path.read_text())
    assert summary["rows"] == summary["read"] == 270 and summary["windows"] == 2
    cols = ["clipscore", "negclip", "normsim_2", "normsim_inf", "normsim_3"]
    tables = {stem: read_sidecar(out, stem) for stem in data}
    for stem, table in tables.items():
        assert table.column_names == ["uid", *cols]
        assert all(table.schema.field(c).type == pa.float32() for c in cols)
        assert (
            table.column("uid").to_pylist()
            == meta_table(stem, len(data[stem][0]))["uid"].to_pylist()
        )
        marker = json.loads((out / f"{stem}.done.json").read_text())
        assert marker["rows"] == marker["read"] == len(data[stem][0])
        assert marker["tau"] == 0.05 and marker["metrics"] == cols
    windows = [["00000", "00001"], ["00002", "00003"]]
    for index, stems in enumerate(windows):
        img = np.concatenate([data[s][0] for s in stems]).astype(np.float32)
        txt = np.concatenate([data[s][1] for s in stems]).astype(np.float32)
        got = {c: np.concatenate([tables[s].column(c).to_numpy() for s in stems]) for c in cols}
        sims = img.astype(np.float64) @ targets.T.astype(np.float64)
        np.testing.assert_allclose(got["clipscore"], (img * txt).sum(1), atol=1e-6)
        expected = negclip_scores(img, txt, tau=0.05, batch_size=64, k=3, seed=(11, index))
        np.testing.assert_allclose(got["negclip"], expected, atol=1e-6)
        np.testing.assert_allclose(got["normsim_2"], np.sqrt((sims**2).sum(1)), atol=1e-5)
        np.testing.assert_allclose(got["normsim_inf"], np.abs(sims).max(1), atol=1e-6)
        np.testing.assert_allclose(got["normsim_3"], (np.abs(sims) ** 3).sum(1) ** (1 / 3), 1e-5)


def test_one_and_two_workers_give_identical_scores_and_resume(tmp_path):
    store = tmp_path / "store"
    make_store(store, [60, 60, 60, 60], d=8)

    def run(out: Path, workers: int, **kw) -> dict:
        cfg = ScoreConfig(batch_size=32, k=2, window=100, **kw)
        return run_score(str(store), str(out), cfg, LocalExecutor(workers=workers, threads=1))

    one, two = tmp_path / "one", tmp_path / "two"
    assert not run(one, 1)["failed"]
    assert not run(two, 2)["failed"]
    for stem in ("00000", "00001", "00002", "00003"):
        assert read_sidecar(one, stem).equals(read_sidecar(two, stem))
    again = run(one, 1)
    assert again["done"] == [] and len(again["already_done"]) == 2
    (one / "00003.done.json").unlink()
    partial = run(one, 1)
    assert partial["done"] == ["w00001:00002..00003"] and len(partial["already_done"]) == 1
    assert read_sidecar(one, "00003").equals(read_sidecar(two, "00003"))
    changed = run(one, 1, seed=1)
    assert len(changed["done"]) == 2
    assert not read_sidecar(one, "00000").equals(read_sidecar(two, "00000"))


def test_datacomp_layout_scores_with_l14_keys(tmp_path):
    store, out = tmp_path / "metadata", tmp_path / "scores"
    store.mkdir()
    rng = np.random.default_rng(1)
    uids = {}
    for stem, n in (("0000000", 40), ("0000001", 25)):
        img, txt = pairs(rng, n, 12)
        uids[stem] = [
            f"{rng.integers(0, 2**63):016x}{rng.integers(0, 2**63):016x}" for _ in range(n)
        ]
        table = pa.table(
            {"uid": uids[stem], "text": ["a caption"] * n, "url": ["http://x/y.jpg"] * n}
        )
        pq.write_table(table, store / f"{stem}.parquet")
        np.savez(store / f"{stem}.npz", l14_img=img, l14_txt=txt, b32_img=img[:, :4])
    result = run_cli(
        store, "--out", out, "--img-key", "l14_img", "--txt-key", "l14_txt",
        "--batch-size", "16", "--k", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "τ=0.01 (default)" in result.output
    for stem, expected in uids.items():
        table = read_sidecar(out, stem)
        assert table.column_names == ["uid", "clipscore", "negclip"]
        assert table.column("uid").to_pylist() == expected
        assert np.isfinite(table.column("negclip").to_numpy()).all()
    assert not list(store.glob("*.done.json"))


def _datacomp_store(root: Path, families: dict[str, int]) -> dict[str, np.ndarray]:
    """A DataComp-like metadata directory: parquet with uid/text, npz with the given families
    (name -> dim), no done markers; returns the arrays written."""
    root.mkdir()
    rng = np.random.default_rng(7)
    arrays: dict[str, np.ndarray] = {}
    for name, d in families.items():
        img, txt = pairs(rng, 30, d)
        arrays[f"{name}_img"], arrays[f"{name}_txt"] = img, txt
    uids = [f"{i:032x}" for i in range(30)]
    pq.write_table(pa.table({"uid": uids, "text": ["x"] * 30}), root / "0000000.parquet")
    np.savez(root / "0000000.npz", **arrays)
    return arrays


def test_npz_keys_are_detected_and_reported(tmp_path):
    arrays = _datacomp_store(tmp_path / "l14", {"l14": 12})
    result = run_cli(tmp_path / "l14", "--out", tmp_path / "s", "--batch-size", "8", "--k", "1")
    assert result.exit_code == 0, result.output
    assert "npz keys: l14_img/l14_txt" in result.output
    got = read_sidecar(tmp_path / "s", "0000000").column("clipscore").to_numpy()
    own = (arrays["l14_img"].astype(np.float32) * arrays["l14_txt"].astype(np.float32)).sum(1)
    np.testing.assert_allclose(got, own, atol=1e-6)
    _datacomp_store(tmp_path / "both", {"l14": 12, "b32": 8})
    ambiguous = run_cli(tmp_path / "both", "--out", tmp_path / "t")
    assert ambiguous.exit_code == 2
    assert ambiguous.output.strip().splitlines() == [
        f"Error: store {tmp_path / 'both'} holds several embedding families "
        "(l14_img/l14_txt, b32_img/b32_txt): choose one with --img-key/--txt-key"
    ]
    chosen = run_cli(
        tmp_path / "both", "--out", tmp_path / "u", "--img-key", "b32_img", "--txt-key", "b32_txt"
    )
    assert chosen.exit_code == 0 and "npz keys: b32_img/b32_txt" in chosen.output


def test_tau_defaults_to_inverse_logit_scale_recorded_in_store(tmp_path):
    store = tmp_path / "store"
    make_store(store, [40], stats={"logit_scale": 50.0})
    cfg = resolve_score(str(store), str(tmp_path / "out"), ScoreConfig())
    assert cfg.tau == pytest.approx(0.02) and "logit_scale" in cfg.tau_source


def test_target_dimension_mismatch_fails_the_window(tmp_path):
    store, out = tmp_path / "store", tmp_path / "scores"
    make_store(store, [50], d=64)
    np.save(tmp_path / "t.npy", unit(np.random.default_rng(0), 10, 32).astype(np.float32))
    result = run_cli(store, "--out", out, "--target", tmp_path / "t.npy", "--json", out / "s.json")
    assert result.exit_code == 1
    assert "embedding dim 64 does not match target dim 32" in result.output
    summary = json.loads((out / "s.json").read_text())
    assert list(summary["failed"]) == ["w00000:00000"]
    assert not list(out.glob("*.scores.parquet")) and not list(out.glob("*.done.json"))


def test_nan_and_inf_embeddings_are_skipped_and_counted(tmp_path):
    store, out = tmp_path / "store", tmp_path / "scores"
    rng = np.random.default_rng(2)
    img, txt = pairs(rng, 80, 8)
    img[3, 0] = np.nan
    txt[10, 5] = np.inf
    img[11] = np.nan
    meta = meta_table("00000", 80)
    write_stem(store, "00000", meta, {"img": img, "txt": txt}, {})
    result = run_cli(store, "--out", out, "--batch-size", "32", "--k", "2", "--json", out / "s")
    assert result.exit_code == 0, result.output
    assert "nonfinite_embedding: 3" in result.output
    table = read_sidecar(out, "00000")
    bad = {meta["uid"][i].as_py() for i in (3, 10, 11)}
    assert table.num_rows == 77 and not bad & set(table.column("uid").to_pylist())
    assert np.isfinite(table.column("negclip").to_numpy()).all()
    marker = json.loads((out / "00000.done.json").read_text())
    assert marker["read"] == 80 and marker["rows"] == 77
    assert marker["skipped"] == {"nonfinite_embedding": 3}
    keep = np.setdiff1d(np.arange(80), [3, 10, 11])
    f, g = img[keep].astype(np.float32), txt[keep].astype(np.float32)
    expected = negclip_scores(f, g, tau=0.01, batch_size=32, k=2, seed=(0, 0))
    np.testing.assert_allclose(table.column("negclip").to_numpy(), expected, atol=1e-6)


def test_duplicate_uids_and_an_all_nan_stem_are_counted_not_lost(tmp_path):
    store, out = tmp_path / "store", tmp_path / "scores"
    rng = np.random.default_rng(5)
    img, txt = pairs(rng, 40, 8)
    meta = meta_table("00000", 40)
    uids = meta["uid"].to_pylist()
    uids[7] = uids[2]
    meta = meta.set_column(0, "uid", pa.array(uids))
    write_stem(store, "00000", meta, {"img": img, "txt": txt}, {})
    bad_img, bad_txt = pairs(rng, 30, 8)
    bad_img[:] = np.nan
    write_stem(store, "00001", meta_table("00001", 30), {"img": bad_img, "txt": bad_txt}, {})
    result = run_cli(store, "--out", out, "--batch-size", "16", "--k", "1", "--json", out / "s")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "s").read_text())
    assert summary["read"] == 70 and summary["rows"] == 39
    assert summary["skipped"] == {"duplicate_uid": 1, "nonfinite_embedding": 30}
    first = read_sidecar(out, "00000")
    assert first.num_rows == 39 and first.column("uid").to_pylist() == uids[:7] + uids[8:]
    assert read_sidecar(out, "00001").num_rows == 0
    marker = json.loads((out / "00001.done.json").read_text())
    assert marker["skipped"] == {"nonfinite_embedding": 30} and marker["rows"] == 0


def forget_file_records(store, *stems: str) -> None:
    """Drop the file records of stems' markers (as a store without them), so the content
    checks below the size check are what a replaced file meets."""
    for stem in stems:
        marker = json.loads((store / f"{stem}.done.json").read_text())
        marker.pop("files")
        (store / f"{stem}.done.json").write_text(json.dumps(marker))


def test_parquet_npz_length_mismatch_fails_that_stem_only(tmp_path):
    store, out = tmp_path / "store", tmp_path / "scores"
    make_store(store, [50, 50, 50], d=8)
    img, txt = pairs(np.random.default_rng(3), 45, 8)
    np.savez(store / "00001.npz", img=img, txt=txt)
    forget_file_records(store, "00001")
    result = run_cli(store, "--out", out, "--batch-size", "32", "--k", "1", "--window", "100")
    assert result.exit_code == 1
    assert "00001: parquet has 50 rows but npz array 'img' has 45" in result.output
    assert "w00000:00000..00001/00001" in result.output
    assert read_sidecar(out, "00000").num_rows == 50
    assert read_sidecar(out, "00002").num_rows == 50
    assert not (out / "00001.scores.parquet").exists()
    rerun = run_cli(store, "--out", out, "--batch-size", "32", "--k", "1", "--window", "100")
    assert rerun.exit_code == 1 and "1 done, 1 already done" in rerun.output


def test_a_stem_of_another_dim_or_int_uids_fails_alone(tmp_path):
    store, out = tmp_path / "store", tmp_path / "scores"
    make_store(store, [20, 20, 20, 20], d=8)
    img, txt = pairs(np.random.default_rng(6), 20, 12)
    np.savez(store / "00001.npz", img=img, txt=txt)
    pq.write_table(pa.table({"uid": pa.array(range(20), pa.int64())}), store / "00002.parquet")
    forget_file_records(store, "00001", "00002")
    result = run_cli(store, "--out", out, "--batch-size", "8", "--k", "1", "--json", out / "s")
    assert result.exit_code == 1
    failed = json.loads((out / "s").read_text())["failed"]
    assert failed == {
        "w00000:00000..00003/00001": "00001: embedding dim 12 differs from its window's 8",
        "w00000:00000..00003/00002": "00002: uid column has type int64, expected strings",
    }
    assert {p.name for p in out.glob("*.done.json")} == {"00000.done.json", "00003.done.json"}
    assert read_sidecar(out, "00003").num_rows == 20


def test_missing_target_file_refuses_before_work(tmp_path):
    store, out = tmp_path / "store", tmp_path / "scores"
    make_store(store, [20])
    result = run_cli(store, "--out", out, "--target", tmp_path / "nope.npy")
    assert result.exit_code == 2
    assert result.output.strip() == f"Error: target file not found: {tmp_path / 'nope.npy'}"
    assert not out.exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--metric", "normsim"], "--metric normsim needs --target PATH"),
        (["--temperature", "0"], "--temperature must be > 0"),
        (["--k", "0"], "--k must be >= 1"),
        (["--p", "-1", "--target", "STORE"], "--p must be a number > 0 or inf"),
        (["--threads", "0"], "--threads must be auto or an integer >= 1"),
        (["--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_bad_options_give_one_line_and_exit_2(tmp_path, args, message):
    store = tmp_path / "store"
    make_store(store, [20])
    args = [str(store) if a == "STORE" else a for a in args]
    result = run_cli(store, "--out", tmp_path / "o", *args)
    assert result.exit_code == 2
    assert result.output.strip().startswith("Error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_targets_load_from_pt_npy_and_store_normalised(tmp_path):
    rng = np.random.default_rng(4)
    raw = rng.standard_normal((30, 8)).astype(np.float32)
    expected = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    torch.save({"image_features": torch.from_numpy(raw).half()}, tmp_path / "in1k_0.pt")
    torch.save(torch.from_numpy(raw), tmp_path / "plain.pt")
    np.save(tmp_path / "t.npy", raw)
    store = tmp_path / "store"
    write_stem(store, "a", meta_table("a", 30), {"img": raw.astype(np.float16)}, {})
    np.testing.assert_allclose(load_target(tmp_path / "in1k_0.pt"), expected, atol=2e-3)
    np.testing.assert_allclose(load_target(tmp_path / "plain.pt"), expected, atol=1e-6)
    np.testing.assert_allclose(load_target(tmp_path / "t.npy"), expected, atol=1e-6)
    np.testing.assert_allclose(load_target(store), expected, atol=2e-3)
    both = load_target([tmp_path / "t.npy", tmp_path / "plain.pt"])
    assert both.shape == (60, 8)


class NotATensor:
    pass


def test_targets_refuse_pickles_and_bad_files(tmp_path):
    torch.save({"image_features": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(UsageError, match="weights_only"):
        load_target(tmp_path / "evil.pt")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UsageError, match="cannot read target"):
        load_target(tmp_path / "obj.npy")
    np.save(tmp_path / "nan.npy", np.full((3, 4), np.nan, dtype=np.float32))
    with pytest.raises(UsageError, match="NaN or Inf"):
        load_target(tmp_path / "nan.npy")
    with pytest.raises(UsageError, match="not found"):
        load_target(tmp_path / "missing.pt")


def test_window_items_name_their_stems(tmp_path):
    store = tmp_path / "store"
    make_store(store, [30, 30, 30])
    cfg = resolve_score(str(store), str(tmp_path / "o"), ScoreConfig(window=50, batch_size=16))
    items = window_items(cfg)
    assert [it.name for it in items] == ["w00000:00000..00001", "w00001:00002"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_at_once(tmp_path):
    store = tmp_path / "store"
    make_store(store, [20])
    result = run_cli(store, "--out", tmp_path / "o", "--device", "cuda")
    assert result.exit_code == 2
    assert (
        result.output.strip() == "Error: --device cuda: no CUDA device is visible to this process"
    )
    assert not (tmp_path / "o").exists()


def test_bf16_on_the_cpu_says_it_falls_back_to_fp32(tmp_path):
    store = tmp_path / "store"
    make_store(store, [40, 30], d=16, seed=3)
    common = ["--batch-size", "16", "--k", "2", "--device", "cpu", "--threads", "1"]
    asked = subprocess_score(store, tmp_path / "bf16", *common, "--precision", "bf16")
    subprocess_score(store, tmp_path / "fp32", *common)
    warnings = [line for line in asked.stderr.splitlines() if line.startswith("Warning")]
    assert warnings == ["Warning: --precision bf16: the CPU has no fast bf16 matmul, using fp32"], (
        asked.stderr
    )
    assert "precision fp32" in asked.stdout
    for stem in ("00000", "00001"):
        bf16, fp32 = (tmp_path / d / f"{stem}.scores.parquet" for d in ("bf16", "fp32"))
        assert bf16.read_bytes() == fp32.read_bytes()


def subprocess_score(store: Path, out: Path, *args: str):
    from conftest import run_cli as run_mmcurate

    proc = run_mmcurate("score", store, "--out", out, *args)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_the_score_bar_moves_within_a_window(tmp_path, monkeypatch, capsys):
    import mmcurate.engine.report as report
    import mmcurate.progress as progress

    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)
    monkeypatch.setattr(report, "MIN_INTERVAL", 0.0)
    store = tmp_path / "store"
    make_store(store, [64], d=8)
    config = ScoreConfig(metrics=("negclip",), batch_size=16, k=2, device="cpu")
    run_score(str(store), str(tmp_path / "o"), config, LocalExecutor(1, 1))
    done = [line.split(" ")[1] for line in capsys.readouterr().err.splitlines()]
    assert done[:-1] == [f"{i / 8:.2f}/1" for i in range(9)], done


def run_watched(*args: str) -> tuple[float, float, float]:
    """Run `python -m mmcurate ARGS`; return (wall, CPU, CPU + waiting for a CPU) in seconds.

    The last comes from every thread's /proc schedstat (time on a CPU, time runnable but waiting
    for one), read until the process ends: on a machine shared with other jobs it still shows
    how many cores the run kept busy, where CPU / wall shows how many it was given.
    """
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path as P

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmcurate", *map(str, args)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen: dict[str, tuple[int, int]] = {}
    while proc.poll() is None:
        for task in P(f"/proc/{proc.pid}/task").glob("*"):
            try:
                run, wait, _ = map(int, (task / "schedstat").read_text().split())
            except (OSError, ValueError):
                continue
            seen[task.name] = (run, wait)
        time.sleep(0.05)
    wall = time.perf_counter() - start
    assert proc.returncode == 0
    cpu = sum(r for r, _ in seen.values()) / 1e9
    return wall, cpu, sum(r + w for r, w in seen.values()) / 1e9


@pytest.mark.slow
def test_default_threads_use_every_core_and_match_an_explicit_count(tmp_path):
    """`mmcurate score` with default flags keeps every usable core busy, and its sidecars are
    byte-identical to a run with --threads set to that count."""
    import os

    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("needs at least 2 usable cores")
    store = tmp_path / "store"
    make_store(store, [16384] * 4, d=256, seed=7)
    args = ["--metric", "negclip", "--batch-size", "8192", "--k", "1", "--temperature", "0.01"]
    out = tmp_path / "default"
    wall, cpu, busy = run_watched(
        "score", store, "--out", out, *args, "--json", tmp_path / "s.json"
    )
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["threads"] == cores
    assert json.loads((out / "00000.done.json").read_text())["threads"] == cores
    assert busy / wall >= 1.5, f"{cpu:.1f} CPU-s, {busy:.1f} busy thread-s in {wall:.1f} s"
    explicit = tmp_path / "explicit"
    subprocess_score(store, explicit, *args, "--threads", str(cores))
    for stem in ("00000", "00001", "00002", "00003"):
        name = f"{stem}.scores.parquet"
        assert (out / name).read_bytes() == (explicit / name).read_bytes()
