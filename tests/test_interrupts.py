"""SIGINT (a terminal's Ctrl-C, to the whole process group), SIGTERM (a scheduler's, to the
command) and a double Ctrl-C sent to real multi-worker `mmcurate score`, `embed` and `buffer`
runs, and to `score` on Ray.

Each must stop within 10 s with exit 130/143, print exactly one `interrupted: N of M shards
done` line and no traceback, leave no process of its session running, keep its finished
stems byte-identical to an uninterrupted run, and resume to a byte-identical result.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from faults.figures import FIGURES, tally_experts, tally_markers
from test_kill_resume import ENV, _command, _finished, _score_store, _session, _snapshot

from mmcurate.demo.corpus import generate_corpus

LINE = re.compile(
    r"^interrupted: (\d+) of (\d+) shards done; run the same command again to resume$"
)
MODES = {
    "sigint": (signal.SIGINT, True, 1, 130),
    "sigterm": (signal.SIGTERM, False, 1, 143),
    "double-sigint": (signal.SIGINT, True, 2, 130),
}


def _ray_processes() -> set[int]:
    """Live Ray processes of any session (raylet, gcs_server, ray:: workers)."""
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(k in cmd for k in (b"raylet", b"gcs_server", b"ray::")):
            found.add(int(entry))
    return found


def _run(args: list[str], log: Path) -> subprocess.CompletedProcess:
    with open(log, "wb") as err:
        proc = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=err, env=ENV, timeout=900)
    assert proc.returncode == 0, log.read_text()[-2000:]
    return proc


def interrupt(
    args: list[str],
    out: Path,
    mode: str,
    log: Path,
    after: int = 1,
    ready: Callable[[], bool] | None = None,
) -> dict:
    """Start the command in its own session, wait until `after` stems are done (or `ready()`),
    signal it as `mode` says; return what happened: exit code, seconds to stop, stderr,
    survivors."""
    signum, group, count, _ = MODES[mode]
    ray_before = _ray_processes()
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=err, env=ENV, start_new_session=True
        )
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if ready() if ready else len(_finished(out, ".done.json")) >= after:
            break
        time.sleep(0.01)
    alive = proc.poll() is None
    start = time.monotonic()
    for i in range(count):
        if i:
            time.sleep(0.2)
        try:
            os.killpg(proc.pid, signum) if group else os.kill(proc.pid, signum)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    stopped = time.monotonic() - start
    grace = time.monotonic() + 5
    while _session(proc.pid) and time.monotonic() < grace:
        time.sleep(0.05)
    while _ray_processes() - ray_before and time.monotonic() < grace:
        time.sleep(0.05)
    left = _session(proc.pid) + sorted(_ray_processes() - ray_before)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return {
        "alive": alive,
        "code": proc.returncode,
        "seconds": stopped,
        "stderr": log.read_text(),
        "left": left,
    }


def check_interrupt(
    args: list[str],
    out: Path,
    ref: Path,
    mode: str,
    tmp: Path,
    executor: str,
    read: int,
    tally: Callable = tally_markers,
) -> None:
    """Interrupt, check every promise, resume, compare byte for byte; record the figure."""
    reference = _snapshot(ref)
    got = interrupt(args, out, mode, tmp / f"{mode}.log")
    lines = got["stderr"].strip().splitlines()
    finished = _finished(out, ".done.json")
    partial = _snapshot(out)
    kept = all(partial[n] == reference[n] for n in partial if n.split(".")[0] in finished)
    _run(args, tmp / f"{mode}-resume.log")
    identical = _snapshot(out) == reference
    survived = (
        got["alive"]
        and got["code"] == MODES[mode][3]
        and got["seconds"] < 10
        and bool(lines)
        and LINE.match(lines[-1]) is not None
        and sum(bool(LINE.match(x)) for x in lines) == 1
        and "Traceback" not in got["stderr"]
        and not got["left"]
        and kept
        and identical
    )
    counted = tally(read, sorted(out.glob("*.done.json")))
    FIGURES.record_fault(f"interrupt: {mode} ({executor})", survived, counted)
    assert got["alive"], "the run finished before the signal"
    assert got["code"] == MODES[mode][3], got
    assert got["seconds"] < 10, got
    assert LINE.match(lines[-1]), got["stderr"][-2000:]
    done, total = map(int, LINE.match(lines[-1]).groups())
    assert done == len(finished) and 0 < done < total, (done, total, len(finished))
    assert sum(bool(LINE.match(x)) for x in lines) == 1, got["stderr"]
    assert "Traceback" not in got["stderr"] and "KeyboardInterrupt" not in got["stderr"]
    assert not got["left"], f"{len(got['left'])} process(es) outlived the command"
    assert kept, "a finished stem differs from the uninterrupted run"
    assert identical, "the resumed result differs from an uninterrupted run"


BASE_FLAGS = ["--metric", "negclip", "--k", "10", "--batch-size", "512", "--window", "1"]
SCORE_FLAGS = [*BASE_FLAGS, "--workers", "2", "--threads", "1"]
STEMS, ROWS = 24, 1000


@pytest.fixture(scope="module")
def score_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt-score")
    _score_store(root / "store", STEMS, ROWS, 64)
    ref = root / "ref"
    _run(_command("score", root / "store", "--out", ref, *SCORE_FLAGS), root / "ref.log")
    return root, ref


@pytest.mark.parametrize("mode", list(MODES))
def test_score_interrupt_two_workers(score_setup, tmp_path, mode):
    root, ref = score_setup
    out = tmp_path / "scores"
    args = _command("score", root / "store", "--out", out, *SCORE_FLAGS)
    check_interrupt(args, out, ref, mode, tmp_path, "local", STEMS * ROWS)


def test_embed_interrupt_two_workers(tmp_path):
    shards = generate_corpus(tmp_path / "src", n_shards=4, per_shard=16, seed=5)
    flags = ["--model", "open_clip:mmc-tiny", "--batch-size", "8", "--decode-workers", "1"]
    flags += ["--workers", "2", "--threads", "1"]
    ref, out = tmp_path / "ref", tmp_path / "store"
    _run(_command("embed", *shards, "--out", ref, *flags), tmp_path / "ref.log")
    args = _command("embed", *shards, "--out", out, *flags)
    check_interrupt(args, out, ref, "sigint", tmp_path, "local", 4 * 16)


def test_buffer_interrupt_two_workers(tmp_path):
    """The distillation side: experts are the items, each kept once its marker is written."""
    generate_corpus(tmp_path / "src", n_shards=2, per_shard=24, seed=5)
    flags = ["--experts", "6", "--epochs", "3", "--batch-size", "8", "--image-size", "32"]
    flags += ["--image-encoder", "convnet-tiny", "--text-encoder", "hf-text:mmc-tiny-bert"]
    flags += ["--no-augment", "--device", "cpu", "--workers", "2", "--threads", "1"]
    ref, out = tmp_path / "ref", tmp_path / "buffers"
    _run(_command("buffer", tmp_path / "src", "--out", ref, *flags), tmp_path / "ref.log")
    args = _command("buffer", tmp_path / "src", "--out", out, *flags)
    check_interrupt(args, out, ref, "sigterm", tmp_path, "local", 6, tally_experts)


def test_distill_interrupt_resumes_from_its_checkpoint(tmp_path):
    """One process, no shards: Ctrl-C keeps the last checkpoint and writes no artifact, and
    `--resume` continues to the synthetic set of a run never stopped."""
    import torch

    generate_corpus(tmp_path / "src", n_shards=1, per_shard=24, seed=5)
    buffers = tmp_path / "buf"
    made = ["--experts", "2", "--epochs", "3", "--batch-size", "8", "--image-size", "32"]
    made += ["--no-augment", "--device", "cpu", "--image-encoder", "convnet-tiny"]
    made += ["--text-encoder", "hf-text:mmc-tiny-bert"]
    _run(_command("buffer", tmp_path / "src", "--out", buffers, *made), tmp_path / "buf.log")
    flags = ["--buffers", str(buffers), "--preset", "tiny", "--pairs", "6", "--mini-batch", "3"]
    flags += ["--syn-steps", "3", "--lr-lr", "0", "--lr-img", "1", "--lr-txt", "1"]
    flags += ["--iterations", "40", "--save-every", "2"]
    flags += ["--device", "cpu"]
    ref, out = tmp_path / "ref.pt", tmp_path / "art.pt"
    _run(_command("distill", tmp_path / "src", "--out", ref, *flags), tmp_path / "ref.log")
    args = _command("distill", tmp_path / "src", "--out", out, *flags)
    checkpoint = tmp_path / "art.ckpt.pt"
    got = interrupt(args, out, "sigint", tmp_path / "int.log", ready=checkpoint.is_file)
    lines = got["stderr"].strip().splitlines()
    assert got["alive"] and got["code"] == 130 and got["seconds"] < 10, got
    assert re.fullmatch(r"interrupted: .*; run the same command again to resume", lines[-1])
    assert "Traceback" not in got["stderr"] and not got["left"], got
    assert checkpoint.is_file() and not out.exists()
    _run([*args, "--resume"], tmp_path / "resume.log")
    resumed = torch.load(out, weights_only=True)
    clean = torch.load(ref, weights_only=True)
    for key in ("images", "texts", "lr_img", "lr_txt"):
        assert torch.equal(torch.as_tensor(resumed[key]), torch.as_tensor(clean[key])), key
    for key, value in clean["similarity"].items():
        assert torch.equal(torch.as_tensor(resumed["similarity"][key]), torch.as_tensor(value))


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_score_interrupt_on_ray(score_setup, tmp_path, mode):
    """Ctrl-C, a scheduler's SIGTERM or a double Ctrl-C to a run on the local Ray instance it
    started: the instance goes too."""
    pytest.importorskip("ray")
    root, ref = score_setup
    out = tmp_path / "scores"
    flags = [*BASE_FLAGS, "--threads", "1", "--executor", "ray"]
    args = _command("score", root / "store", "--out", out, *flags)
    check_interrupt(args, out, ref, mode, tmp_path, "ray", STEMS * ROWS)
