"""`mmcurate pipeline`: stage markers, skip/re-run rules, resume after SIGKILL, bad configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from test_interrupts import interrupt
from test_kill_resume import _command, _session

from mmcurate.demo.faults import DemoSizes, corpus_paths, write_demo_corpus
from mmcurate.demo.run import write_toml
from mmcurate.distill.artifact import load_artifact
from mmcurate.distill.data import load_pairs
from mmcurate.distill.evaluate import EvalConfig, artifact_set, evaluate_small_set
from mmcurate.errors import UsageError
from mmcurate.pipeline import STAGES, load_plan, plan_from_dict

TEXT = "hf-text:mmc-tiny-bert"
SIZES = DemoSizes(train=200, pool=160, target=40, test=50, pool_shards=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A small faulty corpus (4 pool shards of 40 pairs, a target and a test split)."""
    root = tmp_path_factory.mktemp("pipeline-corpus")
    write_demo_corpus(root, SIZES, seed=3)
    return corpus_paths(root, SIZES)


def make_config(
    path: Path,
    corpus: dict,
    *,
    keep=("negclip:0.6",),
    experts: int = 3,
    evaluate: dict | None = None,
    workers: int = 1,
) -> Path:
    """A full select-then-distill config with the tiny networks and small budgets.

    The learned student rates are held fixed (lr_lr = 0): these tests check the pipeline's
    bookkeeping, not the quality of four distillation iterations on random networks.
    """
    config = {
        "out": "run",
        "seed": 5,
        "device": "cpu",
        "workers": workers,
        "threads": 1,
        "embed": {
            "src": [corpus["pool"]],
            "model": "open_clip:mmc-tiny",
            "target_src": [corpus["target"]],
        },
        "score": {
            "metrics": ["clipscore", "negclip", "normsim"],
            "p": ["inf"],
            "batch_size": 32,
            "k": 3,
        },
        "select": {"keep": list(keep)},
        "reshard": {"shard_size": 40},
        "buffer": {
            "experts": experts,
            "epochs": 5,
            "batch_size": 16,
            "image_size": 32,
            "image_encoder": "convnet-tiny",
            "text_encoder": TEXT,
        },
        "distill": {
            "preset": "tiny",
            "pairs": 6,
            "mini_batch": 3,
            "lr_lr": 0.0,
            "iterations": 4,
            "save_every": 2,
        },
        "evaluate": {
            "test": corpus["test"],
            "num_eval": 2,
            "epochs": 3,
            "baselines": ["random"],
            **(evaluate or {}),
        },
    }
    write_toml(path, config)
    return path


def markers(run: Path) -> dict[str, dict]:
    """Every stage marker of a run directory."""
    out = {}
    for stage in STAGES:
        path = run / f"{stage}.stage.json"
        if path.is_file():
            out[stage] = {**json.loads(path.read_text()), "mtime": path.stat().st_mtime_ns}
    return out


def final_outputs(run: Path) -> dict:
    """The outputs that must not depend on interruptions: subset, experts, artifact, recall."""
    art = torch.load(run / "distill" / "distilled.pt", weights_only=True)
    experts = {
        p.name: torch.load(p, weights_only=True)
        for p in sorted((run / "buffer").glob("expert_*.pt"))
    }
    return {
        "subset": (run / "select" / "subset.npy").read_bytes(),
        "experts": {k: (v["image"], v["text"]) for k, v in experts.items()},
        "artifact": (
            art["images"],
            art["texts"],
            art["similarity"]["L"],
            art["lr_img"],
            art["provenance"]["uids"],
        ),
        "recall": {
            p.name: json.loads(p.read_text()) for p in sorted((run / "evaluate").glob("*.json"))
        },
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["subset"] == b["subset"]
    assert a["experts"].keys() == b["experts"].keys()
    for name in a["experts"]:
        for x, y in zip(a["experts"][name], b["experts"][name]):
            assert torch.equal(x, y), name
    for x, y in zip(a["artifact"], b["artifact"]):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    assert a["recall"] == b["recall"]


def _start(cfg: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "mmcurate", "pipeline", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )


def _signal_when(proc: subprocess.Popen, ready, signum: int) -> bool:
    """Send SIGNUM as soon as `ready()`; False when the run ended first."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            os.kill(proc.pid, signum)
            return True
        time.sleep(0.01)
    return False


@pytest.mark.slow
def test_killed_and_interrupted_run_resumes_and_matches_an_uninterrupted_run(tmp_path, corpus):
    """Two workers, MTT distilled beside LoRS: SIGKILL inside buffer, then SIGTERM inside
    evaluate; the third run resumes both and equals a run never stopped."""
    options = {
        "experts": 6,
        "workers": 2,
        "evaluate": {"baselines": ["random", "mtt"], "num_eval": 4, "epochs": 40},
    }
    clean_cfg = make_config(tmp_path / "clean" / "pipeline.toml", corpus, **options)
    done = run_cli("pipeline", clean_cfg)
    assert done.returncode == 0, done.stderr[-2000:]
    reference = final_outputs(tmp_path / "clean" / "run")
    assert (tmp_path / "clean" / "run" / "distill" / "mtt.pt").is_file()
    assert not (tmp_path / "clean" / "run" / "evaluate" / "mtt.pt").exists()

    cfg = make_config(tmp_path / "killed" / "pipeline.toml", corpus, **options)
    run = tmp_path / "killed" / "run"
    proc = _start(cfg)
    killed_mid_buffer = _signal_when(
        proc,
        lambda: (
            (run / "buffer" / "expert_000.done.json").is_file()
            and not (run / "buffer.stage.json").exists()
        ),
        signal.SIGKILL,
    )
    proc.wait(timeout=60)
    deadline = time.monotonic() + 10  # its pool workers die with the fork server, which exits
    while _session(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _session(proc.pid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    proc.stderr.close()
    assert not left, f"{len(left)} process(es) outlived the SIGKILLed pipeline by 10 s"
    assert killed_mid_buffer, "the run was not caught inside the buffer stage"
    assert (run / "buffer.running.json").is_file()
    before = markers(run)
    assert set(before) == {"embed", "score", "select", "reshard"}

    got = interrupt(
        _command("pipeline", cfg),
        run,
        "sigterm",
        tmp_path / "sigterm.log",
        ready=lambda: (
            any((run / "evaluate").glob("*.student*.json"))
            and not (run / "evaluate.stage.json").exists()
        ),
    )
    assert got["alive"], "the run was not caught inside the evaluate stage"
    lines = got["stderr"].strip().splitlines()
    assert got["code"] == 143 and got["seconds"] < 10, got
    assert lines[-1].startswith("interrupted: ") and "Traceback" not in got["stderr"]
    assert not got["left"], "a process outlived the interrupted pipeline"
    assert set(markers(run)) == {"embed", "score", "select", "reshard", "buffer", "distill"}

    again = run_cli("pipeline", cfg, "--json", tmp_path / "again.json")
    assert again.returncode == 0, again.stderr[-2000:]
    report = json.loads((tmp_path / "again.json").read_text())["stages"]
    status = {k: v["status"] for k, v in report.items()}
    assert status == {
        "embed": "skipped",
        "score": "skipped",
        "select": "skipped",
        "reshard": "skipped",
        "buffer": "skipped",
        "distill": "skipped",
        "evaluate": "resumed",
    }
    after = markers(run)
    for stage in ("embed", "score", "select", "reshard"):
        assert after[stage]["mtime"] == before[stage]["mtime"]
    assert not list(run.glob("*.running.json"))
    assert_same(final_outputs(run), reference)


@pytest.mark.slow
def test_changing_select_reruns_select_and_downstream_only(tmp_path, corpus):
    cfg = make_config(tmp_path / "pipeline.toml", corpus, keep=("negclip:0.6",))
    first = run_cli("pipeline", cfg)
    assert first.returncode == 0, first.stderr[-2000:]
    run = tmp_path / "run"
    before = markers(run)
    assert set(before) == set(STAGES)
    subset_before = np.load(run / "select" / "subset.npy")

    unchanged = run_cli("pipeline", cfg)
    assert unchanged.returncode == 0, unchanged.stderr[-2000:]
    assert {k: v["mtime"] for k, v in markers(run).items()} == {
        k: v["mtime"] for k, v in before.items()
    }

    make_config(tmp_path / "pipeline.toml", corpus, keep=("negclip:0.5",))
    second = run_cli("pipeline", cfg)
    assert second.returncode == 0, second.stderr[-2000:]
    after = markers(run)
    for stage in ("embed", "score"):
        assert after[stage]["mtime"] == before[stage]["mtime"], stage
        assert after[stage]["hash"] == before[stage]["hash"]
    for stage in ("select", "reshard", "buffer", "distill", "evaluate"):
        assert after[stage]["mtime"] > before[stage]["mtime"], stage
        assert after[stage]["hash"] != before[stage]["hash"], stage
    # students spread over work items give exactly what `evaluate_small_set` gives
    art = load_artifact(run / "distill" / "distilled.pt")
    test = load_pairs(
        corpus["test"], image_size=32, text_encoder=TEXT, cache_dir=run / "cache", device="cpu"
    )
    direct = evaluate_small_set(
        artifact_set(art), test, EvalConfig(num_eval=2, epochs=3, seed=5), progress=False
    )
    stored = json.loads((run / "evaluate" / "distilled.json").read_text())
    assert stored["runs"] == direct["runs"]
    assert stored["mean_recall"] == direct["mean_recall"]

    subset_after = np.load(run / "select" / "subset.npy")
    assert len(subset_after) == int(0.5 * SIZES.pool) < len(subset_before)
    record = json.loads((run / "select" / "subset.json").read_text())
    assert record["stages"][0]["rule"] == "negclip:0.5"


def test_from_and_until(tmp_path, corpus):
    cfg = make_config(tmp_path / "pipeline.toml", corpus)
    first = run_cli("pipeline", cfg, "--until", "select")
    assert first.returncode == 0, first.stderr[-2000:]
    run = tmp_path / "run"
    assert set(markers(run)) == {"embed", "score", "select"}
    before = markers(run)
    subset = (run / "select" / "subset.npy").read_bytes()

    again = run_cli("pipeline", cfg, "--from", "score", "--until", "select")
    assert again.returncode == 0, again.stderr[-2000:]
    after = markers(run)
    assert after["embed"]["mtime"] == before["embed"]["mtime"]
    assert after["score"]["mtime"] > before["score"]["mtime"]
    assert after["select"]["mtime"] > before["select"]["mtime"]
    assert (run / "select" / "subset.npy").read_bytes() == subset

    refused = run_cli("pipeline", cfg, "--from", "buffer")
    assert refused.returncode == 2
    assert "has not finished" in refused.stderr and "Traceback" not in refused.stderr


def test_select_rules_that_read_the_store_get_it(tmp_path, corpus):
    keep = ("negclip:0.6", "caption_words>4")
    cfg = make_config(tmp_path / "pipeline.toml", corpus, keep=keep)
    done = run_cli("pipeline", cfg, "--until", "select")
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "run"
    direct = tmp_path / "direct.npy"
    rules = [arg for rule in keep for arg in ("--keep", rule)]
    alone = run_cli(
        "select", run / "score", "--store", run / "embed" / "store", "--out", direct, *rules
    )
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert (run / "select" / "subset.npy").read_bytes() == direct.read_bytes()
    negclip_only = tmp_path / "negclip.npy"
    assert (
        run_cli("select", run / "score", "--out", negclip_only, "--keep", keep[0]).returncode == 0
    )
    assert 0 < len(np.load(direct)) < len(np.load(negclip_only))


def test_bad_configs_are_refused_before_any_work(tmp_path):
    cfg = tmp_path / "bad.toml"
    cases = {
        'out = "x"\n[select]\nkeep = ["negclip:0.5"]\n': "[select] needs scores",
        'out = "x"\n[score]\nstore = "nowhere"\n[select]\nkeep = ["negclip:1.5"]\n': "1.5",
        'out = "x"\n[embed]\nsrc = ["a.tar"]\nmodel = "open_clip:mmc-tiny"\nbatch = 3\n': "batch",
        'out = "x"\n[distil]\n': "distil",
        'out = "x"\n[score]\nstore = "s"\n[distill]\npreset = "nope"\n': "nope",
        '[score]\nstore = "s"\n': "out =",
        "out = [\n": "not valid TOML",
    }
    for text, needle in cases.items():
        cfg.write_text(text)
        with pytest.raises(UsageError, match=None) as info:
            load_plan(cfg)
        assert needle in str(info.value), (text, str(info.value))
        assert not (tmp_path / "x").exists()
    cfg.write_text('out = "x"\n[embed]\nsrc = ["a.tar"]\nmodel = "open_clip:mmc-tiny"\nbatch = 3\n')
    result = run_cli("pipeline", cfg)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "Error: " + str(pytest.raises(UsageError, load_plan, cfg).value)
    ]
    missing = run_cli("pipeline", tmp_path / "absent.toml")
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_plan_resolves_paths_against_the_config_directory(tmp_path, corpus):
    cfg = make_config(tmp_path / "sub" / "pipeline.toml", corpus)
    plan = load_plan(cfg)
    assert plan.out == (tmp_path / "sub" / "run").resolve()
    assert plan.stages["embed"]["src"] == [corpus["pool"]]
    with pytest.raises(UsageError):
        load_plan(tmp_path / "none.toml")
    raw = {
        "out": "run",
        "embed": {"src": ["shards/{0..1}.tar"], "model": "open_clip:mmc-tiny@ckpt/t.pt"},
        "buffer": {"data": "/abs/*.tar", "image_encoder": "nfnet_l0@random"},
    }
    plan = plan_from_dict(raw, tmp_path / "cfg" / "p.toml")
    base = (tmp_path / "cfg").resolve()
    assert plan.stages["embed"]["src"] == [str(base / "shards/{0..1}.tar")]
    assert plan.stages["embed"]["model"] == f"open_clip:mmc-tiny@{base / 'ckpt/t.pt'}"
    assert plan.stages["buffer"]["image_encoder"] == "nfnet_l0@random"
    assert plan.stages["buffer"]["data"] == "/abs/*.tar"


def test_example_configs_parse():
    examples = Path(__file__).resolve().parent.parent / "examples"
    datacomp = load_plan(examples / "datacomp.toml")
    assert list(datacomp.stages) == ["score", "select"]
    assert datacomp.stages["score"]["img_key"] == "l14_img"
    assert datacomp.stages["select"]["keep"] == ["negclip:0.3", "normsim_inf:0.2"]
    corpus = load_plan(examples / "webdataset.toml")
    assert list(corpus.stages) == list(STAGES)
    assert corpus.stages["distill"]["preset"] == "flickr-100"


def test_the_pipeline_gives_its_own_steps_every_core_and_workers_their_share(tmp_path, corpus):
    from click.testing import CliRunner

    from mmcurate.cli.main import cli
    from mmcurate.engine import pinned, resolve_threads

    config = {
        "out": str(tmp_path / "run"),
        "device": "cpu",
        "workers": 2,
        "embed": {"src": [corpus["pool"]], "model": "open_clip:mmc-tiny", "decode_workers": 0},
    }
    write_toml(tmp_path / "pipeline.toml", config)
    with pinned(1):  # the test process gets its own threads back afterwards
        result = CliRunner().invoke(cli, ["pipeline", str(tmp_path / "pipeline.toml")])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == resolve_threads("auto", 1)
    embed = json.loads((tmp_path / "run" / "embed.stage.json").read_text())
    assert embed["summary"]["store"]["threads"] == resolve_threads("auto", 2)
