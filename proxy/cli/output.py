"""Where the commands print: a terminal gets its own width; a pipe, a file or a CI log
(no terminal) gets tables whole, never cut or wrapped to a width nobody reads them at."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from rich.console import Console

# Wide enough for every table the commands print with their longest names: without a
# terminal, a line is never cut to fit one.
PIPE_WIDTH = 250


def output_width(stream: TextIO, columns: str | None) -> int | None:
    """The width to print at: None (the terminal's own) on a terminal; without one, at
    least PIPE_WIDTH (more if `COLUMNS` asks for more)."""
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return None
    try:
        asked = int(columns) if columns else 0
    except ValueError:
        asked = 0
    return max(asked, PIPE_WIDTH)


def output_console(*, stderr: bool = False) -> Console:
    """The console a command prints its output (or, `stderr`, its errors) on."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=output_width(stream, os.environ.get("COLUMNS")))
