"""`--device cuda` on a machine without a GPU: every command and the pipeline refuse at once,
in one line, with exit code 2, before writing anything."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_CLIP

from mmcurate.cli.main import cli

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
MESSAGE = "Error: --device cuda: no CUDA device is visible to this process"


def commands(corpus: str, tmp) -> dict[str, list[str]]:
    data = str(tmp / "pairs.json")
    return {
        "embed": ["embed", corpus, "--out", str(tmp / "out"), "--model", TINY_CLIP],
        "score": ["score", str(tmp), "--out", str(tmp / "out")],
        "buffer": ["buffer", data, "--out", str(tmp / "out")],
        "distill": ["distill", data, "--buffers", str(tmp), "--out", str(tmp / "out" / "d.pt")],
        "evaluate": ["evaluate", str(tmp / "d.pt"), "--test", data],
    }


@pytest.mark.parametrize("command", ["embed", "score", "buffer", "distill", "evaluate"])
def test_every_command_refuses_cuda_without_a_gpu(corpus3, tmp_path, command):
    args = commands(str(corpus3[0]), tmp_path)[command]
    result = CliRunner().invoke(cli, [*args, "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [MESSAGE]
    assert not (tmp_path / "out").exists()


def test_the_pipeline_refuses_cuda_without_a_gpu(corpus3, tmp_path):
    config = tmp_path / "pipeline.toml"
    config.write_text(
        f'out = "{tmp_path / "out"}"\ndevice = "cuda"\n'
        f'[embed]\nsrc = ["{corpus3[0]}"]\nmodel = "{TINY_CLIP}"\n'
    )
    for extra in ([], ["--device", "cuda"]):
        cfg = config if not extra else tmp_path / "cpu.toml"
        if extra:
            cfg.write_text(config.read_text().replace('device = "cuda"', 'device = "cpu"'))
        result = CliRunner().invoke(cli, ["pipeline", str(cfg), *extra])
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines() == [MESSAGE]
    assert not (tmp_path / "out").exists()


def test_ray_cuda_without_gpus_per_task_is_refused_before_ray_starts(corpus3, tmp_path):
    args = commands(str(corpus3[0]), tmp_path)["embed"]
    result = CliRunner().invoke(cli, [*args, "--device", "cuda", "--executor", "ray"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "Error: --device cuda on Ray needs --ray-gpus > 0 (GPUs per task)"
    ]
