"""Reliability figures of the fault suite: damaged inputs tried, crashes, samples lost, kills.

Counting rules:
- a *case* is one distinct damaged input (its files' digest) run by one command; running the
  same command again over the same input is a *re-run*, counted apart;
- samples lost are always computed, never given: `read - written - skipped`, where `read` is
  how many samples the finished part of the input holds (the generator's ground truth) and
  `written` and `skipped` come from the command's own records (done markers, summaries). A
  `Tally` is only made by the `tally_*` functions below, which read those records.

The fault tests and the kill test record into `FIGURES`; `tests/faults/conftest.py` prints the
table at the end of a pytest session and writes it as JSON to `$MMCURATE_FIGURES` (default
`.pytest_cache/mmcurate-fault-figures.json`). To produce the README figures in one go:

    .venv/bin/python tests/faults/figures.py [--json PATH]

runs the fault suite, the kill-and-resume test and the loading-safety test, then prints the
table as markdown; `--fault-classes` runs only the interrupt, lock, damaged-file and
full-disk tests and prints their table.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_JSON = Path(".pytest_cache") / "mmcurate-fault-figures.json"
_TOKEN = object()


@dataclass(frozen=True)
class Tally:
    """Samples of one run: the input's truth and what the command's records account for."""

    read: int
    written: int
    skipped: int
    records: tuple[str, ...]
    token: object = None

    def __post_init__(self) -> None:
        if self.token is not _TOKEN:
            raise TypeError("make a Tally with a tally_* function, from the command's records")

    @property
    def lost(self) -> int:
        """Samples neither written nor counted as skipped."""
        return self.read - self.written - self.skipped


def _load(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a record")
    return data


def tally_markers(read: int, markers: Iterable[Path]) -> Tally:
    """embed and score: `rows` written and `skipped` by reason, summed over the done markers
    of the finished stems, whose samples (ground truth) number `read`."""
    written = skipped = 0
    records = []
    for path in markers:
        marker = _load(path)
        written += int(marker["rows"])
        skipped += sum(int(v) for v in marker["skipped"].values())
        records.append(str(path))
    return Tally(read, written, skipped, tuple(records), _TOKEN)


def tally_experts(read: int, markers: Iterable[Path]) -> Tally:
    """buffer: expert files, each vouched for by its done marker, of `read` experts asked for."""
    records = [str(p) for p in markers if _load(p)["files"]]
    return Tally(read, len(records), 0, tuple(records), _TOKEN)


def tally_select(read: int, record: Path) -> Tally:
    """select: rows kept (the subset plus merged duplicate uids) and rows each stage dropped,
    from subset.json; `read` is the pool's rows. No record (refused or failed): nothing."""
    if not Path(record).is_file():
        return Tally(0, 0, 0, (), _TOKEN)
    data = _load(record)
    dropped = sum(int(s["input"]) - int(s["count"]) for s in data["stages"])
    kept = int(data["selected"]) + int(data["duplicate_uids"])
    return Tally(read, kept, dropped, (str(record),), _TOKEN)


def tally_reshard(read: int, summary: Path) -> Tally:
    """reshard: samples written, and those not copied by design (not in the subset, a
    repeated uid, skipped by reason), from its summary; `read` counts the finished shards."""
    if not Path(summary).is_file():
        return Tally(0, 0, 0, (), _TOKEN)
    data = _load(summary)
    not_copied = int(data["not_selected"]) + sum(int(v) for v in data["skipped"].values())
    not_copied += int(data["duplicates_within_shards"]) + int(data["duplicates_across_shards"])
    return Tally(read, int(data["written"]), not_copied, (str(summary),), _TOKEN)


def input_digest(paths: Sequence[Path]) -> str:
    """A digest of the damaged input: every file's relative name and bytes (dirs recursively)."""
    h = hashlib.blake2b(digest_size=16)
    for root in map(Path, paths):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            h.update(str(path.relative_to(root.parent)).encode("utf-8", "surrogateescape"))
            h.update(path.read_bytes() if path.is_file() else b"<missing>")
    return h.hexdigest()


class Figures:
    """Counters filled by the tests while they run."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()
        self.cases: Counter[str] = Counter()
        self.reruns: Counter[str] = Counter()
        self.damaged: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.samples: Counter[str] = Counter()
        self.crashes: list[str] = []
        self.lost: Counter[str] = Counter()
        self.kills: Counter[str] = Counter()
        self.kills_survived: Counter[str] = Counter()
        self.fault_cases: Counter[str] = Counter()
        self.fault_survived: Counter[str] = Counter()
        self.fault_lost: Counter[str] = Counter()

    def record_run(
        self, command: str, digest: str, faults: list[str], crash: str | None, tally: Tally
    ) -> None:
        """One command run over the input with this digest: a new case the first time, a
        re-run after; its faults, a crash if any, and the samples it lost."""
        if not isinstance(tally, Tally):
            raise TypeError("record_run needs a Tally made from the command's records")
        if (command, digest) in self.seen:
            self.reruns[command] += 1
        else:
            self.seen.add((command, digest))
            self.cases[command] += 1
            self.damaged[command] += bool(faults)
            self.faults.update(faults)
            self.samples[command] += tally.read
        self.lost[command] += tally.lost
        if crash:
            self.crashes.append(f"{command}: {crash}")

    def record_kill(self, command: str, survived: bool) -> None:
        """One SIGKILL of a running command; survived when the resumed result is identical."""
        self.kills[command] += 1
        self.kills_survived[command] += int(survived)

    def record_fault(self, kind: str, survived: bool, tally: Tally) -> None:
        """One injected fault of a class (an interrupt, a full disk, a concurrent start, a
        damaged file): whether every promise held, and the samples lost by the end of its
        runs, from the command's records."""
        if not isinstance(tally, Tally):
            raise TypeError("record_fault needs a Tally made from the command's records")
        self.fault_cases[kind] += 1
        self.fault_survived[kind] += int(survived)
        self.fault_lost[kind] += tally.lost

    def as_dict(self) -> dict:
        """The figures as plain JSON data."""
        commands = sorted(set(self.cases) | set(self.kills))
        return {
            "cases": sum(self.cases.values()),
            "damaged_inputs": sum(self.damaged.values()),
            "reruns": sum(self.reruns.values()),
            "crashes": len(self.crashes),
            "samples_read": sum(self.samples.values()),
            "samples_lost": sum(self.lost.values()),
            "kills": sum(self.kills.values()),
            "kills_survived": sum(self.kills_survived.values()),
            "by_command": {
                c: {
                    "cases": self.cases[c],
                    "damaged_inputs": self.damaged[c],
                    "reruns": self.reruns[c],
                    "samples_read": self.samples[c],
                    "samples_lost": self.lost[c],
                    "kills": self.kills[c],
                    "kills_survived": self.kills_survived[c],
                }
                for c in commands
            },
            "faults": dict(sorted(self.faults.items())),
            "crash_list": list(self.crashes),
            "fault_classes": {
                k: {
                    "cases": self.fault_cases[k],
                    "survived": self.fault_survived[k],
                    "samples_lost": self.fault_lost[k],
                }
                for k in sorted(self.fault_cases)
            },
        }

    def empty(self) -> bool:
        """True when no test recorded anything."""
        return not self.cases and not self.kills and not self.fault_cases


FIGURES = Figures()


def table(data: dict) -> str:
    """The figures as a markdown table (what goes into the README)."""
    lines = [
        "| command | distinct inputs | damaged | re-runs | samples read | samples lost "
        "| kills survived |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def row(name: str, r: dict, bold: bool = False) -> str:
        kills = f"{r['kills_survived']} of {r['kills']}" if r["kills"] else "-"
        cells = [r["cases"], r["damaged_inputs"], r["reruns"], r["samples_read"]]
        cells += [r["samples_lost"], kills]
        cells = [f"**{c}**" if bold else str(c) for c in [name, *cells]]
        return "| " + " | ".join(cells) + " |"

    for command, r in data["by_command"].items():
        lines.append(row(command, r))
    lines.append(row("total", data, bold=True))
    lines.append("")
    lines.append(
        "A distinct input is one damaged input (by content) given to one command; running it "
        "again counts as a re-run. Samples read count the finished part of each distinct "
        "input; samples lost = read - written - skipped, from the command's own records, "
        "summed over every run."
    )
    lines.append(f"Crashes (tracebacks or internal errors): {data['crashes']}")
    for crash in data["crash_list"]:
        lines.append(f"- {crash}")
    lines.append(
        f"Distinct faults: {len(data['faults'])} "
        f"({', '.join(f'{k} {v}' for k, v in data['faults'].items())})"
    )
    return "\n".join(lines)


def fault_table(data: dict) -> str:
    """The fault classes a cluster job meets, one row each, as a markdown table."""
    classes = data.get("fault_classes") or {}
    lines = ["| fault | cases | survived | samples lost |", "|---|---:|---:|---:|"]
    for kind, r in classes.items():
        lines.append(f"| {kind} | {r['cases']} | {r['survived']} | {r['samples_lost']} |")
    total = [sum(r[k] for r in classes.values()) for k in ("cases", "survived", "samples_lost")]
    lines.append("| **total** | " + " | ".join(f"**{t}**" for t in total) + " |")
    return "\n".join(lines)


def write(path: str | os.PathLike, data: dict) -> None:
    """Write the figures JSON (plain write: this is a test report, not a pipeline output)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


CLASS_TESTS = [
    "tests/faults/test_figures.py",  # loads tests/faults/conftest.py, which saves the figures
    "tests/test_interrupts.py",
    "tests/test_lock.py",
    "tests/test_verify.py",
    "tests/test_disk_full.py",
]


def main() -> int:
    """Run the fault suite and kill test with figures enabled; print the markdown tables.
    With `--fault-classes`, only the tests of the fault classes (interrupts, locks, damaged
    files, full disk) and their table."""
    root = Path(__file__).resolve().parents[2]
    out = Path(sys.argv[sys.argv.index("--json") + 1]) if "--json" in sys.argv else None
    out = (out or root / DEFAULT_JSON).resolve()
    out.unlink(missing_ok=True)
    env = {**os.environ, "MMCURATE_FIGURES": str(out), "OMP_NUM_THREADS": "1"}
    classes_only = "--fault-classes" in sys.argv
    tests = CLASS_TESTS if classes_only else ["tests/faults", "tests/test_kill_resume.py"]
    tests += [] if classes_only else ["tests/test_loading_safety.py", *CLASS_TESTS[1:]]
    code = subprocess.call([sys.executable, "-m", "pytest", *tests, "-q"], cwd=root, env=env)
    if not out.is_file():
        print("no figures were recorded", file=sys.stderr)
        return code or 1
    data = json.loads(out.read_text())
    if not classes_only:
        print(table(data) + "\n")
    print(fault_table(data))
    print(f"\n(JSON: {out}; pytest exit code {code})")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
