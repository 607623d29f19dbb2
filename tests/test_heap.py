"""A training process keeps its freed heap: repeated large allocations stop faulting pages in."""

import json
import subprocess
import sys

import pytest

# Four 16 MiB tensors touched and freed per step, as a training step's activations are: glibc's
# default trims them off the heap's top after every step, so each step faults them back in.
STEPS = r"""
import json, resource, sys
import torch
from mmcurate.distill.heap import keep_freed_heap
kept = keep_freed_heap() if sys.argv[1] == "keep" else None
def step():
    tensors = [torch.ones(4 << 20) for _ in range(4)]
    del tensors
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"kept": kept, "faults": faults}))
"""
PAGES_PER_STEP = 4 * (16 << 20) // 4096


def _faults(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", STEPS, mode], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap only")
def test_kept_heap_stops_refaulting_freed_tensors():
    default, kept = _faults("default"), _faults("keep")
    if not kept["kept"]:
        pytest.skip("this C library has no glibc mallopt")
    # glibc's default re-faults a step's pages on most runs, on some (by address layout) once
    assert default["faults"] > PAGES_PER_STEP
    assert kept["faults"] < PAGES_PER_STEP // 2  # kept: ten steps fault under half of one
