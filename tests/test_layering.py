"""Import layering (SPEC §1), enforced by import-linter's contracts in pyproject.toml."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mmcurate

ROOT = Path(mmcurate.__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on the package under `root`, with the contracts of its pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT), "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_tree_keeps_every_contract():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "planted", "contract"),
    [
        ("data/uid.py", "import mmcurate.cli.main\n", "Layers"),
        ("embed/spec.py", "from mmcurate.curate import select\n", "Layers"),
        ("curate/rules.py", "import mmcurate.distill.losses\n", "independent"),
        ("engine/base.py", "def _late():\n    import mmcurate.embed.stage\n", "engine holds"),
    ],
)
def test_a_planted_upward_import_breaks_its_contract(tmp_path, module, planted, contract):
    shutil.copytree(ROOT / "mmcurate", tmp_path / "mmcurate")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "mmcurate" / module, "a") as fh:
        fh.write("\n\n" + planted)
    result = lint(tmp_path)
    assert result.returncode != 0
    broken = [line for line in result.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(contract in line for line in broken), result.stdout
    assert module.removesuffix(".py").replace("/", ".") in result.stdout
