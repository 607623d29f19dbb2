"""Shared fixtures: offline hub, generated corpora, and running the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

from mmcurate.data.uid import sample_uid

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_CLIP = "open_clip:mmc-tiny"


@dataclass(frozen=True)
class Item:
    """A work item for executor tests: a name and a number."""

    name: str
    x: int = 0


@pytest.fixture(scope="session")
def corpus3(tmp_path_factory) -> list[Path]:
    """A clean 3-shard generated corpus of 3 x 40 pairs (do not modify)."""
    from mmcurate.demo import generate_corpus

    return generate_corpus(tmp_path_factory.mktemp("corpus3"), n_shards=3, per_shard=40, seed=1)


def run_cli(*args: str, cwd: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m mmcurate ARGS` in a fresh process as a user would, capturing output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    return subprocess.run(
        [sys.executable, "-m", "mmcurate", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def embed_args(src, out, *extra) -> list[str]:
    """`mmcurate embed` arguments for the tiny CLIP, decoding in the task process."""
    return [
        "embed",
        *map(str, src),
        "--out",
        str(out),
        "--model",
        TINY_CLIP,
        "--batch-size",
        "16",
        "--decode-workers",
        "0",
        *extra,
    ]


def meta_table(stem: str, n: int) -> pa.Table:
    """A store stem's metadata for n synthetic rows: keys 000000…, their uids, captions."""
    keys = [f"{i:06d}" for i in range(n)]
    return pa.table(
        {
            "uid": [sample_uid(stem, k) for k in keys],
            "key": keys,
            "caption": [f"caption {k}" for k in keys],
            "url": [None] * n,
            "shard": [stem] * n,
        }
    )
