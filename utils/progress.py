"""Progress bars of the command-line scripts (tqdm on stderr).

On a terminal: a bar redrawn in place. When stderr is not a terminal (a batch job, ``nohup``, CI,
``2> log.txt``) a redrawn bar would fill the log with carriage-return updates ten times a second;
there the bar becomes one plain line at the start, one every :data:`LOG_INTERVAL` seconds and one
at the end.
"""
from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

__all__ = ["LOG_INTERVAL", "progress_bar"]

#: seconds between progress lines when stderr is not a terminal
LOG_INTERVAL = 30.0


class _Lines:
    """A stream for tqdm that writes each redraw as a line of its own (no carriage returns)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, desc: str, enabled: bool | None = True, unit: str = "img", in_logs: bool = True,
                 **options) -> tqdm:
    """A tqdm bar on stderr. ``enabled``: False draws nothing, None draws only on a terminal.
    ``in_logs`` False: nothing either when stderr is not a terminal (for loops that log their own
    progress lines). ``options`` go to tqdm (``initial``, ``leave`` ...)."""
    terminal = sys.stderr.isatty()
    if enabled is False or (not terminal and (enabled is None or not in_logs)):
        return tqdm(total=total, disable=True)
    if terminal:
        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, **options)
    return tqdm(total=total, desc=desc, unit=unit, file=_Lines(sys.stderr), ncols=100, ascii=True,
                mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL, **options)
