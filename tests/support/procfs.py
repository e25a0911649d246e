"""Linux /proc files written for tests, so sources that read them can be driven."""

from __future__ import annotations

from pathlib import Path


def write_stat(
    path: Path,
    user: int,
    system: int,
    idle: int,
    iowait: int = 0,
    *,
    nice: int = 0,
    irq: int = 0,
    softirq: int = 0,
    steal: int = 0,
    guest: int = 0,
) -> None:
    """Write a /proc/stat look-alike: aggregate line, one per-CPU line and noise after."""
    counters = f"{user} {nice} {system} {idle} {iowait} {irq} {softirq} {steal} {guest} 0"
    path.write_text(
        f"cpu  {counters}\ncpu0 {counters}\nintr 12345 0 0 0\nctxt 999\nbtime 1700000000\n",
        encoding="ascii",
    )
