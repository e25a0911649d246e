"""The host CPU's model name, for labels and reports ("AMD EPYC 9654 96-Core Processor")."""

from __future__ import annotations

import contextlib


def cpu_model(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """The first CPU's `model name` in /proc/cpuinfo (`Model` on Arm), or "" if none."""
    with contextlib.suppress(OSError), open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model"):
                return value.strip()
    return ""
