"""Processes a test started, found by a mark in their environment: a command under test
and every server it starts (which inherit the mark), whatever else runs on the machine."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path


def marked_env(
    base: Mapping[str, str] | None = None, **extra: str
) -> tuple[dict[str, str], str]:
    """`base` (this process's environment) with `extra` and a mark of its own; the mark."""
    mark = f"ENERGY_PROXY_TEST_MARK={uuid.uuid4().hex}"
    key, _, value = mark.partition("=")
    return {**(os.environ if base is None else base), **extra, key: value}, mark


def alive_with(mark: str) -> list[str]:
    """Command lines of live processes whose environment holds `mark`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            if mark.encode() in environ and (proc / "stat").read_text().split()[2] != "Z":
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found
