"""What the energy was measured on, in words a reader wants: "NVIDIA H100 80GB HBM3", not
"nvml:0". Used by the Energy Score label, `/readyz` and the bench report."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable


def cpu_model(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """The first CPU's `model name` in /proc/cpuinfo (`Model` on Arm), or "" if none."""
    with contextlib.suppress(OSError), open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model"):
                return value.strip()
    return ""


def describe_hardware(sources: Iterable[tuple[str, str, str]]) -> str:
    """`(name, hardware, method)` of each power source -> one line, identical devices
    counted: "2 x NVIDIA H100 80GB HBM3 (nvml-counter), AMD EPYC 9654 (rapl)". A source
    without a hardware name (constant, trace) is named by itself."""
    counts: dict[tuple[str, str], int] = {}
    for name, hardware, method in sources:
        key = (hardware or name, method)
        counts[key] = counts.get(key, 0) + 1
    parts = [
        f"{n} x {what} ({method})" if n > 1 else f"{what} ({method})"
        for (what, method), n in counts.items()
    ]
    return ", ".join(parts) or "unknown"
