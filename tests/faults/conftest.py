"""Print and save the fault suite's figures at the end of the session."""

from __future__ import annotations

import os
from pathlib import Path

from faults.figures import DEFAULT_JSON, FIGURES, fault_table, table, write


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """The figures table, and its JSON for the README."""
    if FIGURES.empty():
        return
    data = FIGURES.as_dict()
    path = Path(os.environ.get("MMCURATE_FIGURES") or config.rootpath / DEFAULT_JSON)
    write(path, data)
    terminalreporter.write_sep("=", "mmcurate fault figures")
    if data["cases"] or data["kills"]:
        terminalreporter.write_line(table(data))
    if data["fault_classes"]:
        terminalreporter.write_line(fault_table(data))
    terminalreporter.write_line(f"figures JSON: {path}")
