"""Waiting for something another thread or process does: a bound on the wait, never a
speed assertion (these machines are noisy)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(cond: Callable[[], object], timeout_s: float = 10.0, interval_s: float = 0.02) -> bool:
    """Poll `cond` until it holds or `timeout_s` passes; whether it held."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval_s)
    return bool(cond())


def wait_until(cond: Callable[[], object], timeout_s: float = 30.0) -> None:
    """`wait_for`, failing the test when `cond` never held."""
    assert wait_for(cond, timeout_s, interval_s=0.005), "condition not met in time"
