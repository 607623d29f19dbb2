"""The Ray executor on a real local Ray cluster: same bytes as local, retries, resume, optional."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from click.testing import CliRunner
from conftest import TINY_CLIP, Item, embed_args, run_cli

from mmcurate.cli.embed_cmd import embed
from mmcurate.cli.main import Group
from mmcurate.cli.score_cmd import score
from mmcurate.data.shards import ShardItem
from mmcurate.demo import generate_corpus
from mmcurate.embed.encoders import _cached
from mmcurate.embed.stage import EmbedConfig, embed_shard
from mmcurate.engine import Outcome, run_stage
from mmcurate.engine.ray_executor import RayExecutor
from mmcurate.errors import ShardError, UsageError

CLI = Group(name="mmcurate", commands={"embed": embed, "score": score})
# results are byte-identical for a given thread count: every comparison pins the cluster's 2
THREADS = ("--threads", "2")

# Ray workers cannot import this test module, so its work functions travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray.cloudpickle.register_pickle_by_value(sys.modules["conftest"])


@pytest.fixture(scope="module")
def cluster() -> str:
    """A Ray cluster of 2 CPUs and 1 logical GPU owned by this test process; yields its address."""
    ctx = ray.init(
        address="local",
        num_cpus=2,
        num_gpus=1,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


def invoke(*args: str):
    """Run `mmcurate embed|score` in this process, with the real group's error handling."""
    return CliRunner().invoke(CLI, list(args))


def store_bytes(out: Path) -> dict[str, bytes]:
    """Every output file's bytes; done markers without their wall-clock `seconds`."""
    files = {}
    for p in sorted(out.iterdir()):
        if p.name.startswith("."):
            continue
        if p.name.endswith(".done.json"):
            marker = json.loads(p.read_text())
            marker.pop("seconds", None)
            files[p.name] = json.dumps(marker, sort_keys=True).encode()
        else:
            files[p.name] = p.read_bytes()
    return files


def embed_job(out: Path) -> tuple[EmbedConfig, str]:
    """The config `mmcurate embed` builds for the tiny CLIP with --batch-size 16, and the store."""
    return EmbedConfig(TINY_CLIP, batch_size=16, device="cpu", decode_workers=0), str(out)


def items_of(corpus: list[Path]) -> list[ShardItem]:
    return [ShardItem(p.stem, str(p)) for p in corpus]


@pytest.fixture(scope="module")
def local_store(corpus3, tmp_path_factory) -> Path:
    """corpus3 embedded by the local executor: the reference bytes."""
    out = tmp_path_factory.mktemp("local") / "store"
    result = invoke(*embed_args(corpus3, out, *THREADS))
    assert result.exit_code == 0, result.output
    return out


# --------------------------------------------------------------------------- work functions


def embed_reporting_loads(config: EmbedConfig, out: str, item: ShardItem) -> dict:
    """embed_shard, plus this process's id and how many encoders it has built so far."""
    stats = embed_shard(config, out, item)
    return {**stats, "pid": os.getpid(), "loads": _cached.cache_info().misses}


def embed_failing_once(marker_dir: str, config: EmbedConfig, out: str, item: ShardItem) -> dict:
    """embed_shard, but the first attempt at each shard dies: worker killed, or an exception."""
    marker = Path(marker_dir) / item.name
    with open(marker, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    if len(marker.read_text().splitlines()) == 1:
        if item.name.endswith("0"):
            os._exit(1)
        raise RuntimeError("transient failure\nsecond line")
    return embed_shard(config, out, item)


def report_resources(item: Item) -> dict:
    """What Ray granted this task, and the compute threads it runs with."""
    import torch

    assigned = ray.get_runtime_context().get_assigned_resources()
    return {
        "resources": assigned,
        "torch_threads": torch.get_num_threads(),
        "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def target_buffer(target, item: Item) -> dict:
    """Where this task sees the config's array: process, address, and whether it is shared."""
    return {"pid": os.getpid(), "address": target.ctypes.data, "shared": not target.flags.writeable}


def wait_for_marker(marker: str, item: Item) -> dict:
    """The `slow` item waits (up to 60 s) for a file the driver writes after another outcome."""
    deadline = time.monotonic() + 60
    while item.name == "slow" and not Path(marker).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"saw_marker": Path(marker).exists()}


def count_attempts(marker_dir: str, item: Item) -> dict:
    """Fails as the item's name says, recording each attempt."""
    with open(Path(marker_dir) / item.name, "a") as fh:
        fh.write("attempt\n")
    if item.name == "bad":
        raise ShardError("bad.tar: truncated tar (unexpected end of data)")
    if item.name == "always":
        raise RuntimeError("still broken\ntraceback-like second line")
    return {"rows": 1}


# --------------------------------------------------------------------------- tests


def test_embed_and_score_on_ray_match_local_bytes(cluster, corpus3, local_store, tmp_path):
    ray_store = tmp_path / "ray_store"
    result = invoke(
        *embed_args(corpus3, ray_store, "--executor", "ray", "--ray-address", cluster, *THREADS)
    )
    assert result.exit_code == 0, result.output
    assert "3 done, 0 already done" in result.output
    assert store_bytes(ray_store) == store_bytes(local_store)
    assert len(store_bytes(local_store)) == 9

    score_args = [
        "--metric",
        "clipscore",
        "--metric",
        "negclip",
        "--metric",
        "normsim",
        "--target",
        str(local_store),
        "--p",
        "2",
        "--p",
        "inf",
        "--batch-size",
        "16",
        "--k",
        "3",
        "--window",
        "40",
        *THREADS,
    ]
    local_scores, ray_scores = tmp_path / "local_scores", tmp_path / "ray_scores"
    result = invoke("score", str(local_store), "--out", str(local_scores), *score_args)
    assert result.exit_code == 0, result.output
    result = invoke(
        "score",
        str(ray_store),
        "--out",
        str(ray_scores),
        *score_args,
        "--executor",
        "ray",
        "--ray-address",
        cluster,
    )
    assert result.exit_code == 0, result.output
    sidecars = sorted(p.name for p in local_scores.glob("*.scores.parquet"))
    assert len(sidecars) == 3
    for name in sidecars:
        assert (ray_scores / name).read_bytes() == (local_scores / name).read_bytes(), name


def test_weights_load_once_per_worker_process(cluster, tmp_path):
    corpus = generate_corpus(tmp_path / "corpus", n_shards=6, per_shard=16, seed=2)
    fn = functools.partial(embed_reporting_loads, *embed_job(tmp_path / "store"))
    outcomes = list(RayExecutor(cluster, threads=1, num_gpus=0).map(fn, items_of(corpus)))
    assert [o.ok for o in outcomes] == [True] * 6, outcomes
    pids = {o.stats["pid"] for o in outcomes}
    assert len(pids) < len(outcomes), "Ray should reuse worker processes across tasks"
    assert {o.stats["loads"] for o in outcomes} == {1}, "each process builds the encoder once"


def test_failing_tasks_are_retried_and_outputs_complete(cluster, corpus3, local_store, tmp_path):
    markers = tmp_path / "attempts"
    markers.mkdir()
    out = tmp_path / "store"
    fn = functools.partial(embed_failing_once, str(markers), *embed_job(out))
    outcomes, skipped = run_stage(RayExecutor(cluster, 2, 0), fn, items_of(corpus3), desc="t")
    assert [(o.name, o.ok) for o in outcomes] == [(p.stem, True) for p in corpus3], outcomes
    assert skipped == []
    attempts = {p.name: len(p.read_text().splitlines()) for p in markers.iterdir()}
    assert attempts == {p.stem: 2 for p in corpus3}
    assert any(p.stem.endswith("0") for p in corpus3), "one shard must exercise a worker crash"
    assert store_bytes(out) == store_bytes(local_store)


def test_shard_errors_are_not_retried_and_exhausted_retries_fail_alone(cluster, tmp_path):
    fn = functools.partial(count_attempts, str(tmp_path))
    items = [Item(n) for n in ("always", "bad", "good")]
    outcomes = {o.name: o for o in RayExecutor(cluster, 1, 0, max_retries=2).map(fn, items)}
    assert outcomes["good"] == Outcome("good", True, outcomes["good"].stats, None)
    assert outcomes["good"].stats["rows"] == 1
    assert outcomes["bad"] == Outcome(
        "bad", False, {}, "bad.tar: truncated tar (unexpected end of data)"
    )
    assert outcomes["always"].ok is False
    assert outcomes["always"].error == "RuntimeError: still broken (after 2 retries)"
    attempts = {n: len((tmp_path / n).read_text().splitlines()) for n in outcomes}
    assert attempts == {"always": 3, "bad": 1, "good": 1}


def test_tasks_request_threads_as_cpus_and_fractional_gpus(cluster):
    items = [Item(str(i)) for i in range(4)]
    cases = [(1, 0.5, {"CPU": 1.0, "GPU": 0.5}, "0"), (2, 0, {"CPU": 2.0}, "")]
    for threads, gpus, expected, visible in cases:
        outcomes = list(RayExecutor(cluster, threads, gpus).map(report_resources, items))
        assert len(outcomes) == 4
        for o in outcomes:
            assert o.ok, o
            assert o.stats["resources"] == expected
            assert o.stats["torch_threads"] == threads
            assert o.stats["visible_gpus"] == visible


def test_work_function_is_broadcast_once_through_the_object_store(cluster):
    target = np.random.default_rng(0).standard_normal((2048, 64)).astype(np.float32)
    fn = functools.partial(target_buffer, target)
    items = [Item(str(i)) for i in range(8)]
    outcomes = list(RayExecutor(cluster, 1, 0).map(fn, items))
    assert all(o.ok and o.stats["shared"] for o in outcomes), outcomes
    by_pid: dict[int, set[int]] = {}
    for o in outcomes:
        by_pid.setdefault(o.stats["pid"], set()).add(o.stats["address"])
    assert len(by_pid) < len(outcomes)
    assert all(len(addresses) == 1 for addresses in by_pid.values()), by_pid


def test_outcomes_stream_as_tasks_finish(cluster, tmp_path):
    marker = tmp_path / "fast-outcome-seen"
    fn = functools.partial(wait_for_marker, str(marker))
    outcomes = RayExecutor(cluster, 1, 0).map(fn, [Item("slow"), Item("fast")])
    first = next(outcomes)
    assert first.name == "fast"
    marker.touch()
    second = next(outcomes)
    assert second.name == "slow" and second.stats["saw_marker"] is True
    assert list(outcomes) == []


def _done_times(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.done.json")}


def _settle(out: Path, quiet: float = 3.0, limit: float = 60.0) -> dict[str, int]:
    """Wait until no done marker has appeared for `quiet` seconds (the killed job's tasks end)."""
    start, last, seen = time.monotonic(), time.monotonic(), _done_times(out)
    while time.monotonic() - last < quiet and time.monotonic() - start < limit:
        time.sleep(0.2)
        now = _done_times(out)
        if now != seen:
            seen, last = now, time.monotonic()
    return seen


@pytest.mark.slow
def test_resume_after_driver_sigkill_redoes_only_unfinished_stems(cluster, tmp_path):
    corpus = generate_corpus(tmp_path / "corpus", n_shards=8, per_shard=60, seed=4)
    reference = tmp_path / "reference"
    assert invoke(*embed_args(corpus, reference, *THREADS)).exit_code == 0
    out = tmp_path / "store"
    args = embed_args(corpus, out, "--executor", "ray", "--ray-address", cluster, *THREADS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "mmcurate", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("*.done.json")) and time.monotonic() < deadline:
            assert driver.poll() is None, "the driver ended before any shard was done"
            time.sleep(0.02)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finished = _settle(out)
    assert 0 < len(finished) < len(corpus), f"kill landed badly: {sorted(finished)}"

    result = run_cli(*args, "--json", str(tmp_path / "summary.json"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    done_before = sorted(n[: -len(".done.json")] for n in finished)
    assert sorted(summary["already_done"]) == done_before
    assert sorted(summary["done"]) == sorted(p.stem for p in corpus if p.stem not in done_before)
    after = _done_times(out)
    assert {n: after[n] for n in finished} == finished, "finished stems must not be rewritten"
    assert store_bytes(out) == store_bytes(reference)


def test_ray_missing_exits_2_with_install_hint(corpus3, tmp_path):
    fake = tmp_path / "no_ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    path = os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "store"
    result = subprocess.run(
        [sys.executable, "-m", "mmcurate", *embed_args(corpus3, out, "--executor", "ray")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == ["Error: --executor ray needs Ray: pip install 'mmcurate[ray]'"]
    assert not out.exists()


def test_unreachable_or_malformed_address_is_refused_in_one_line(corpus3, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    out = tmp_path / "store"
    for address, message in [
        (closed, f"Error: cannot reach Ray at {closed}: ConnectionRefusedError"),
        ("head-node", "Error: --ray-address must be auto or HOST:PORT, got 'head-node'"),
    ]:
        result = invoke(*embed_args(corpus3, out, "--executor", "ray", "--ray-address", address))
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines()[0].startswith(message), result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def reporting_item(item: Item) -> dict:
    """Reports a quarter, a half and three quarters done, a little apart, then finishes."""
    from mmcurate.engine import report_progress

    for fraction in (0.25, 0.5, 0.75):
        report_progress(fraction)
        time.sleep(0.4)
    return {"rows": 1}


def test_progress_from_ray_tasks_reaches_the_driver(cluster):
    events: list = []
    executor = RayExecutor(cluster, 1, 0)
    sink = functools.partial(_note, events)
    for outcome in executor.map(reporting_item, [Item("a"), Item("b")], sink):
        events.append((outcome.name, "done"))
    for name in ("a", "b"):
        assert [f for n, f in events if n == name] == [0.25, 0.5, 0.75, "done"], events


def _note(events: list, name: str, fraction: float) -> None:
    events.append((name, fraction))


def test_auto_threads_on_ray_divide_the_smallest_node(cluster):
    executor = RayExecutor(cluster, "auto", 0, workers=2)
    outcomes = list(executor.map(report_resources, [Item("x")]))
    assert executor.threads == 1 and outcomes[0].stats["resources"] == {"CPU": 1.0}
    assert RayExecutor(cluster, "auto", 0).connect() is None
    with pytest.raises(UsageError, match="no Ray node has that many CPUs"):
        RayExecutor(cluster, 3, 0).connect()


def test_gpu_requests_are_checked_against_the_cluster_at_once(cluster, tmp_path):
    with pytest.raises(UsageError, match="--device cuda on Ray needs --ray-gpus > 0"):
        RayExecutor(cluster, 1, 0).check_device("cuda")
    with pytest.raises(UsageError, match=r"--ray-gpus 2: the Ray cluster has 1 GPU\(s\)"):
        RayExecutor(cluster, 1, 2).check_device("auto")
    RayExecutor(cluster, 1, 0.5).check_device("cuda")
    assert RayExecutor(cluster, 1, 0.5).task_device("auto") == "cuda"
    assert RayExecutor(cluster, 1, 0).task_device("auto") == "cpu"


def test_the_pipeline_gives_ray_tasks_its_gpus(cluster, corpus3, tmp_path):
    from mmcurate.engine import make_executor
    from mmcurate.pipeline import plan_from_dict, run_pipeline

    raw = {
        "out": str(tmp_path / "run"),
        "executor": "ray",
        "ray_address": cluster,
        "ray_gpus": 0.5,
        "threads": 1,
        "embed": {"src": [str(p) for p in corpus3], "model": TINY_CLIP, "decode_workers": 0},
    }
    plan = plan_from_dict(raw, tmp_path / "pipeline.toml")
    executor = make_executor(plan.executor)
    assert isinstance(executor, RayExecutor) and executor.num_gpus == 0.5
    outcomes = list(executor.map(report_resources, [Item("x")]))
    assert outcomes[0].stats["resources"] == {"CPU": 1.0, "GPU": 0.5}
    copying = list(executor.cpu_only().map(report_resources, [Item("y")]))
    assert copying[0].stats["resources"] == {"CPU": 1.0} and executor.num_gpus == 0.5
    too_many = plan_from_dict({**raw, "ray_gpus": 4}, tmp_path / "pipeline.toml")
    with pytest.raises(UsageError, match="the Ray cluster has 1 GPU"):
        run_pipeline(too_many, progress=False)
    assert not (tmp_path / "run").exists()
