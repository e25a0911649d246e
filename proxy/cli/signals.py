"""SIGTERM and SIGHUP as Ctrl-C: a command that starts servers stops them on whichever
signal ends it (a script's `kill`, systemd, `docker stop`, a closed terminal), not only
on Ctrl-C."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Final

TERMINATING_SIGNALS: Final = (signal.SIGTERM, signal.SIGHUP)


class Terminated(Exception):
    """The process was asked to stop by `signum` (SIGTERM or SIGHUP)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


@contextmanager
def terminated_on_signals() -> Iterator[None]:
    """Within: SIGTERM or SIGHUP raise `Terminated` in the main thread, once; a second
    signal while the first unwinds (servers stopping) is ignored, so the cleanup runs to
    its end. The handlers in place before are restored on the way out."""
    raised = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise Terminated(signum)

    before = {signum: signal.signal(signum, handler) for signum in TERMINATING_SIGNALS}
    try:
        yield
    finally:
        for signum, previous in before.items():
            signal.signal(signum, previous)


@contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Within: SIGTERM and SIGHUP are Ctrl-C (KeyboardInterrupt in the main thread), for
    a command whose Ctrl-C already stops what it started and keeps what it did. Outside
    the main thread, nothing changes (signals are the main thread's)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, signal.default_int_handler) for s in TERMINATING_SIGNALS}
    try:
        yield
    finally:
        for signum, previous in before.items():
            signal.signal(signum, previous)
