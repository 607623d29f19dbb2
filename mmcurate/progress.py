"""Progress bars: tqdm on a terminal; in a log, one plain line per bar at most every 30 s.

A log (stderr not a TTY) gets whole lines without carriage returns: the stage, done/total,
elapsed < remaining and the rate, at the start, at most every `LOG_INTERVAL` seconds while it
runs, and once more at the end.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

LOG_INTERVAL = 30.0
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
FRACTION_FORMAT = LOG_FORMAT.replace("{n_fmt}", "{n:.2f}")
TTY_FRACTION_FORMAT = "{l_bar}{bar}| " + FRACTION_FORMAT.split(": ", 1)[1]


class LogBar(tqdm):
    """A tqdm that writes whole lines, for log files."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        """Write the bar's state as one line; an empty message (tqdm clearing) writes nothing."""
        line = (self.__str__() if msg is None else msg).strip()
        if not line:
            return False
        self.fp.write(line + "\n")
        self.fp.flush()
        return True

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        """Update the postfix; it shows in the next line written, never in a line of its own."""
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def clear(self, nolock: bool = False) -> None:
        """Nothing to clear in a log."""

    def close(self) -> None:
        """The final line (unless leave=False), without tqdm's terminal clean-up."""
        if not self.disable and self.leave is not False:
            self.display()
        self.leave = False
        super().close()


def progress_bar(
    iterable: Iterable | None = None, fractional: bool = False, **options: Any
) -> tqdm:
    """A progress bar (tqdm's options) that suits where stderr goes; a `fractional` bar counts
    items that advance in parts (shown with two decimals)."""
    if sys.stderr.isatty():
        if fractional:
            options.setdefault("bar_format", TTY_FRACTION_FORMAT)
        return tqdm(iterable, dynamic_ncols=True, **options)
    bar_format = FRACTION_FORMAT if fractional else LOG_FORMAT
    miniters = 0.01 if fractional else 1
    return LogBar(
        iterable, mininterval=LOG_INTERVAL, miniters=miniters, bar_format=bar_format, **options
    )
