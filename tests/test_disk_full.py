"""A full disk: EFBIG under a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) and ENOSPC on a
small tmpfs. The items that cannot write fail with one line naming the file and the cause, the
others finish; no final file is truncated, no temporary file is left, the run exits 1 with its
summary; after space is freed the same command completes, byte-identical to a clean run."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from faults.figures import FIGURES, tally_markers
from faults.harness import TEMP_NAME, unparseable_files
from test_kill_resume import ENV, _command, _snapshot

from mmcurate.data.store import write_stem

FLAGS = ["--metric", "clipscore", "--window", "1"]
ROWS = (200, 2000, 300, 1800, 250, 2200)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Stems of very different sizes, so a size limit fails some of them and not others."""
    root = tmp_path_factory.mktemp("diskfull") / "store"
    rng = np.random.default_rng(5)
    for s, rows in enumerate(ROWS):
        img = rng.standard_normal((rows, 32))
        txt = img + rng.standard_normal((rows, 32))
        arrays = {
            k: (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)
            for k, v in (("img", img), ("txt", txt))
        }
        uids = [f"{rng.integers(2**63):016x}{rng.integers(2**63):016x}" for _ in range(rows)]
        write_stem(root, f"{s:05d}", pa.table({"uid": uids}), arrays, {"logit_scale": 100.0})
    return root


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory) -> Path:
    ref = tmp_path_factory.mktemp("diskfull-ref") / "scores"
    subprocess.run(_command("score", store, "--out", ref, *FLAGS), env=ENV, check=True)
    return ref


def _limit(size: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return apply


def _check_failed_run(proc: subprocess.CompletedProcess, out: Path, cause: str) -> list[str]:
    """The promises of a run that hit a full disk; returns its failure lines."""
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "threads: None" not in proc.stdout
    failed = [x.strip() for x in proc.stdout.splitlines() if cause in x]
    assert failed, proc.stdout
    for line in failed:
        assert f"{out}/" in line and line.endswith(cause), line
    assert not [n for n in os.listdir(out) if TEMP_NAME.match(n)], os.listdir(out)
    assert not unparseable_files(out)
    return failed


def _record(kind: str, ok: bool, out: Path) -> None:
    tally = tally_markers(sum(ROWS), sorted(out.glob("*.done.json")))
    FIGURES.record_fault(kind, ok, tally)


def test_file_size_limit_fails_big_items_only(store, reference, tmp_path):
    out = tmp_path / "scores"
    args = _command("score", store, "--out", out, *FLAGS)
    limited = subprocess.run(
        args, capture_output=True, text=True, env=ENV, preexec_fn=_limit(40_000), timeout=600
    )
    failed = _check_failed_run(limited, out, "file too large (the file size limit, ulimit -f)")
    done = {p.name.split(".")[0] for p in out.glob("*.done.json")}
    assert 0 < len(done) < len(ROWS) and len(failed) == len(ROWS) - len(done)
    assert all(_snapshot(out)[n] == _snapshot(reference)[n] for n in _snapshot(out))
    freed = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600)
    identical = freed.returncode == 0 and _snapshot(out) == _snapshot(reference)
    _record("disk full: file size limit (EFBIG)", identical, out)
    assert freed.returncode == 0, freed.stderr[-2000:]
    assert identical


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_enospc_on_a_small_tmpfs(store, reference, tmp_path):
    mount = tmp_path / "mnt"
    mount.mkdir()
    total = sum(p.stat().st_size for p in reference.iterdir())
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={total // 2}", "tmpfs", mount],
            check=True,
            capture_output=True,
        )
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        out = mount / "scores"
        args = _command("score", store, "--out", out, *FLAGS)
        full = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600)
        _check_failed_run(full, out, "no space left on device")
        subprocess.run(["mount", "-o", f"remount,size={total * 4}", mount], check=True)
        freed = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600)
        identical = freed.returncode == 0 and _snapshot(out) == _snapshot(reference)
        _record("disk full: tmpfs (ENOSPC)", identical, out)
        assert freed.returncode == 0, freed.stderr[-2000:]
        assert identical
    finally:
        subprocess.run(["umount", "-l", mount], check=False)
        shutil.rmtree(mount, ignore_errors=True)


def test_embed_under_a_file_size_limit(tmp_path):
    """embed writes parquet, npz and markers: the shards whose npz exceeds the limit fail."""
    from mmcurate.demo.corpus import generate_corpus

    small = generate_corpus(tmp_path / "a", n_shards=2, per_shard=4, seed=2, image_size=16)
    big = generate_corpus(tmp_path / "b", n_shards=2, per_shard=40, seed=3, image_size=16)
    big = [p.rename(p.with_name(f"1{p.name[1:]}")) for p in big]  # stems 10000, 10001
    flags = ["--model", "open_clip:mmc-tiny", "--decode-workers", "0"]
    ref, out = tmp_path / "ref", tmp_path / "store"
    shards = [*small, *big]
    subprocess.run(_command("embed", *shards, "--out", ref, *flags), env=ENV, check=True)
    limit = max(p.stat().st_size for p in ref.glob("0000*")) + 1  # the small shards fit
    args = _command("embed", *shards, "--out", out, *flags)
    limited = subprocess.run(
        args, capture_output=True, text=True, env=ENV, preexec_fn=_limit(limit), timeout=600
    )
    failed = _check_failed_run(limited, out, "file too large (the file size limit, ulimit -f)")
    done = {p.name.split(".")[0] for p in out.glob("*.done.json")}
    assert 0 < len(done) < len(shards) and len(failed) == len(shards) - len(done)
    freed = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600)
    identical = freed.returncode == 0 and _snapshot(out) == _snapshot(ref)
    tally = tally_markers(2 * 4 + 2 * 40, sorted(out.glob("*.done.json")))
    FIGURES.record_fault("disk full: file size limit (EFBIG)", identical, tally)
    assert freed.returncode == 0, freed.stderr[-2000:]
    assert identical
