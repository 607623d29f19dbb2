"""The GPU acceptance script runs end to end at tiny sizes on the CPU (`--cpu-dry-run`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_acceptance.py"


@pytest.mark.slow
def test_cpu_dry_run_measures_every_section(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SCRIPT.parents[1])}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    assert result["dry_run"] is True and result["environment"]["device"] == "cpu"
    sections = result["sections"]
    assert list(sections) == ["embed", "score", "normsim", "distill", "demo"]
    rows = [r for s in sections.values() for r in s["rows"]]
    assert all(r["value"] == r["value"] and r["value"] > 0 for r in rows), rows
    whats = {r["what"] for r in rows}
    assert "open_clip:mmc-tiny stage, gpu decode" in whats
    assert {f"agreement {p} vs float64, τ=0.01" for p in ("fp32", "tf32", "bf16")} <= whats
    assert {"flickr-100 shapes, --matching tesla", "flickr-100 shapes, --matching full"} <= whats
    assert all(r["ok"] for r in rows if r["section"] == "demo")
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == len(rows) + 1
    assert not (tmp_path / "work").exists()
