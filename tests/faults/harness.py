"""Running the real CLI over damaged inputs and checking what every run must guarantee."""

from __future__ import annotations

import json
import re
import tarfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from click.testing import CliRunner
from hypothesis import HealthCheck, settings

from mmcurate.cli.main import cli

TINY = "open_clip:mmc-tiny"
TEMP_NAME = re.compile(r"^\..+\.tmp$")


def fault_settings(examples: int) -> settings:
    """Hypothesis settings of the suite: reproducible in CI (derandomised, no example
    database), no deadline (a run starts the real CLI)."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@dataclass
class Run:
    """What one in-process CLI run left: exit code, output and any crash."""

    exit_code: int
    output: str
    crash: str | None


def crash_of(exit_code: int, output: str, exception: BaseException | None) -> str | None:
    """A traceback, an escaped exception or an `internal error`: what a user must never see."""
    if exception is not None and not isinstance(exception, SystemExit):
        first = str(exception).strip().splitlines()[0] if str(exception).strip() else ""
        return f"{type(exception).__name__}: {first}"
    if "Traceback" in output:
        return "traceback in output: " + output[output.index("Traceback") :][:300]
    match = re.search(r"internal error.*", output)
    if match:
        return match.group(0)[:300]
    if exit_code not in (0, 1, 2):
        return f"exit code {exit_code}"
    return None


def invoke(*args: str) -> Run:
    """Run `mmcurate ARGS` in this process with click's runner, as the console script would.

    Warnings are appended to the output as the CLI prints them (`Warning: ...`), since pytest
    would otherwise capture them.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)
    output = result.output + "".join(f"Warning: {w.message}\n" for w in caught)
    return Run(result.exit_code, output, crash_of(result.exit_code, output, result.exception))


def error_lines(output: str) -> list[str]:
    """The `Error: ...` lines a run printed."""
    return [line for line in output.splitlines() if line.startswith("Error:")]


def unparseable_files(root: Path) -> list[str]:
    """Final-named files under root that do not parse completely (must be none, ever)."""
    bad = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if TEMP_NAME.match(path.name):
            continue
        try:
            _parse(path)
        except Exception as exc:
            bad.append(f"{path.relative_to(root)}: {type(exc).__name__}: {exc}")
    return bad


def _parse(path: Path) -> None:
    name = path.name
    if name.endswith(".parquet"):
        pq.read_table(path)
    elif name.endswith(".npz"):
        with zipfile.ZipFile(path) as zf:
            if zf.testzip() is not None:
                raise ValueError("bad member CRC")
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                npz[key]
    elif name.endswith(".npy"):
        np.load(path, allow_pickle=False)
    elif name.endswith(".json"):
        json.loads(path.read_text())
    elif name.endswith(".tar"):
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                data = tar.extractfile(member).read() if member.isfile() else b""
                if len(data) != member.size:
                    raise ValueError(f"member {member.name} cut short")


def temp_files(root: Path) -> list[str]:
    """Temporary files left behind (a run that ended normally must leave none)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if TEMP_NAME.match(p.name))


def failure_covers(failed: dict[str, str], stem: str) -> bool:
    """True when a summary's `failed` names the stem, alone or inside a window `a..b`."""
    for name in failed:
        if name == stem or name.endswith(f"/{stem}") or name.endswith(f":{stem}"):
            return True
        span = name.split(":", 1)[-1]
        if "/" not in span and ".." in span:
            first, last = span.split("..", 1)
            if first <= stem <= last:
                return True
    return False
