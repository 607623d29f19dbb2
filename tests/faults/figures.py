"""Reliability figures of the fault suite: damaged inputs tried, crashes, samples lost, kills.

The fault tests and the kill test record into `FIGURES`; `tests/faults/conftest.py` prints the
table at the end of a pytest session and writes it as JSON to `$MMCURATE_FIGURES` (default
`.pytest_cache/mmcurate-fault-figures.json`). To produce the README figures in one go:

    .venv/bin/python tests/faults/figures.py [--json PATH]

runs the fault suite, the kill-and-resume test and the loading-safety test, then prints the
table as markdown.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

DEFAULT_JSON = Path(".pytest_cache") / "mmcurate-fault-figures.json"


class Figures:
    """Counters filled by the tests while they run."""

    def __init__(self) -> None:
        self.runs: Counter[str] = Counter()
        self.damaged: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.samples: Counter[str] = Counter()
        self.crashes: list[str] = []
        self.lost: Counter[str] = Counter()
        self.kills: Counter[str] = Counter()
        self.kills_survived: Counter[str] = Counter()

    def record_run(
        self,
        command: str,
        faults: list[str],
        crash: str | None = None,
        lost: int = 0,
        read: int = 0,
    ) -> None:
        """One command run over damaged inputs: its faults, a crash if any, samples lost."""
        self.runs[command] += 1
        self.damaged[command] += len(faults)
        self.faults.update(faults)
        self.samples[command] += read
        self.lost[command] += lost
        if crash:
            self.crashes.append(f"{command}: {crash}")

    def record_kill(self, command: str, survived: bool) -> None:
        """One SIGKILL of a running command; survived when the resumed result is identical."""
        self.kills[command] += 1
        self.kills_survived[command] += int(survived)

    def as_dict(self) -> dict:
        """The figures as plain JSON data."""
        return {
            "cases": sum(self.runs.values()),
            "damaged_inputs": sum(self.damaged.values()),
            "crashes": len(self.crashes),
            "samples_read": sum(self.samples.values()),
            "samples_lost": sum(self.lost.values()),
            "kills": sum(self.kills.values()),
            "kills_survived": sum(self.kills_survived.values()),
            "by_command": {
                c: {
                    "cases": self.runs[c],
                    "damaged_inputs": self.damaged[c],
                    "samples_read": self.samples[c],
                    "samples_lost": self.lost[c],
                    "kills": self.kills[c],
                    "kills_survived": self.kills_survived[c],
                }
                for c in sorted(set(self.runs) | set(self.kills))
            },
            "faults": dict(sorted(self.faults.items())),
            "crash_list": list(self.crashes),
        }

    def empty(self) -> bool:
        """True when no test recorded anything."""
        return not self.runs and not self.kills


FIGURES = Figures()


def table(data: dict) -> str:
    """The figures as a markdown table (what goes into the README)."""
    lines = [
        "| command | cases | damaged inputs | samples read | samples lost | kills survived |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for command, row in data["by_command"].items():
        kills = f"{row['kills_survived']} of {row['kills']}" if row["kills"] else "-"
        lines.append(
            f"| {command} | {row['cases']} | {row['damaged_inputs']} | {row['samples_read']} | "
            f"{row['samples_lost']} | {kills} |"
        )
    kills = f"{data['kills_survived']} of {data['kills']}" if data["kills"] else "-"
    lines.append(
        f"| **total** | **{data['cases']}** | **{data['damaged_inputs']}** | "
        f"**{data['samples_read']}** | **{data['samples_lost']}** | **{kills}** |"
    )
    lines.append("")
    lines.append(f"Crashes (tracebacks or internal errors): {data['crashes']}")
    for crash in data["crash_list"]:
        lines.append(f"- {crash}")
    lines.append(
        f"Distinct faults: {len(data['faults'])} "
        f"({', '.join(f'{k} {v}' for k, v in data['faults'].items())})"
    )
    return "\n".join(lines)


def write(path: str | os.PathLike, data: dict) -> None:
    """Write the figures JSON (plain write: this is a test report, not a pipeline output)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def main() -> int:
    """Run the fault suite and kill test with figures enabled; print the markdown table."""
    root = Path(__file__).resolve().parents[2]
    out = Path(sys.argv[sys.argv.index("--json") + 1]) if "--json" in sys.argv else None
    out = (out or root / DEFAULT_JSON).resolve()
    out.unlink(missing_ok=True)
    env = {**os.environ, "MMCURATE_FIGURES": str(out), "OMP_NUM_THREADS": "1"}
    tests = ["tests/faults", "tests/test_kill_resume.py", "tests/test_loading_safety.py"]
    code = subprocess.call([sys.executable, "-m", "pytest", *tests, "-q"], cwd=root, env=env)
    if not out.is_file():
        print("no figures were recorded", file=sys.stderr)
        return code or 1
    print(table(json.loads(out.read_text())))
    print(f"\n(JSON: {out}; pytest exit code {code})")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
