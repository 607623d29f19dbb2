"""Defaults live once, on each stage's config dataclass; CLI, pipeline and library agree."""

from __future__ import annotations

import re
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
from click.testing import CliRunner

import mmcurate
from mmcurate.cli.main import cli
from mmcurate.curate.reshard import ReshardConfig
from mmcurate.curate.score_config import ScoreConfig
from mmcurate.curate.select import SelectConfig
from mmcurate.distill.buffers import BufferConfig
from mmcurate.distill.evaluate import EvalConfig
from mmcurate.embed.stage import EmbedConfig
from mmcurate.engine import ExecutorConfig
from mmcurate.pipeline.config import DEFAULTS, TOP_LEVEL

COMMANDS = {
    "embed": EmbedConfig,
    "score": ScoreConfig,
    "select": SelectConfig,
    "reshard": ReshardConfig,
    "buffer": BufferConfig,
    "evaluate": EvalConfig,
}
RENAMED = {"eval_momentum": "momentum", "executor_name": "executor"}


def defaults(cls: type) -> dict:
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_click_options_default_to_the_config_dataclass(command):
    expected = {**defaults(COMMANDS[command]), **defaults(ExecutorConfig)}
    params = {RENAMED.get(p.name, p.name): p for p in cli.commands[command].params}
    shared = sorted(set(params) & set(expected))
    assert len(shared) >= 4, shared
    for name in shared:
        param = params[name]
        got = param.default
        if param.multiple:
            got = tuple(got) if isinstance(got, list | tuple) else ()
        assert got == expected[name], (command, name)
    help_text = CliRunner().invoke(cli, [command, "--help"], terminal_width=200).output
    for name in shared:
        value = expected[name]
        if params[name].show_default and value not in (None, ()):
            assert f"[default: {value}]" in " ".join(help_text.split()), (command, name)


def test_the_pipeline_reads_the_same_defaults():
    for stage, cls in (
        ("embed", EmbedConfig),
        ("score", ScoreConfig),
        ("select", SelectConfig),
        ("reshard", ReshardConfig),
        ("buffer", BufferConfig),
    ):
        for name, value in defaults(cls).items():
            if name in DEFAULTS[stage]:
                assert DEFAULTS[stage][name] == value, (stage, name)
    assert DEFAULTS["evaluate"]["eval_momentum"] == EvalConfig.momentum
    assert {k: TOP_LEVEL[k] for k in defaults(ExecutorConfig)} == defaults(ExecutorConfig)


@pytest.mark.parametrize(
    "pattern,files",
    [
        (r"\b32768\b", 1),
        (r"\b1_?048_?576\b", 1),
        (r'"nfnet_l0"', 1),
        (r'"hf-text:bert-base-uncased"', 1),
        (r"\b10_?000\b", 1),
        # two defaults are "auto": the device (embed/encoders.py) and the threads (engine/base.py)
        (r'(?<![=!<>])=\s*"auto"', ["base.py", "encoders.py"]),
    ],
)
def test_a_default_value_is_written_once_in_the_package(pattern, files):
    hits = [
        f"{path.name}:{i}"
        for path in Path(mmcurate.__file__).parent.rglob("*.py")
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(pattern, line)
    ]
    if isinstance(files, list):
        assert sorted(h.split(":")[0] for h in hits) == files, hits
    else:
        assert len(hits) == files, hits
