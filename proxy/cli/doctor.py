"""`energy-proxy doctor`: what this host can measure and what it costs, before trusting it.

For each power source (those `--power-source` names; `auto`: every sensor kind, absent
ones with the reason): its method and hardware, each call it makes timed (wall p50/p99 and
CPU), how often its energy counter moves, the power now, whether GPU power limits can be
set (for `bench --sweep`), and what the proxy will do with it. Exit 0 when at least one
source works, 1 when none does, 2 for a malformed SPEC. `--json` prints the same as JSON.
"""

from __future__ import annotations

import json
import platform
import sys
from typing import Any

from metering.sources.nvml import nvml_factory
from metering.sources.probe import SourceReport, probe
from metering.sources.rapl import rapl_factory


def _fmt_s(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def render(reports: list[SourceReport], spec: str) -> str:
    lines = [
        f"energy-proxy doctor: power source {spec!r} on {platform.node()} "
        f"({platform.machine()}, Python {platform.python_version()})",
        "",
    ]
    for r in reports:
        if not r.method:
            lines.append(f"{r.name}: not available: {r.problem}")
            lines.append("")
            continue
        state = "ok" if r.ok else f"FAILING: {r.problem}"
        lines.append(f"{r.name}  {r.hardware or '(hardware unnamed)'}  {r.method}  {state}")
        width = max(len(c.call) for c in r.calls) if r.calls else 4
        lines.append(f"  {'call':<{width}}  {'p50':>10}  {'p99':>10}  {'CPU p50':>10}")
        for c in r.calls:
            errors = f"  ({c.errors} of {c.calls} failed)" if c.errors else ""
            lines.append(
                f"  {c.call:<{width}}  {_fmt_s(c.p50_s):>10}  {_fmt_s(c.p99_s):>10}  "
                f"{_fmt_s(c.cpu_p50_s):>10}{errors}"
            )
        if r.counter_period_s is not None:
            lines.append(f"  energy counter moves every {r.counter_period_s:.3f} s")
        if r.power_w is not None:
            lines.append(f"  power now: {r.power_w:.1f} W")
        if r.power_limit:
            lines.append(f"  power limit: {r.power_limit}")
        lines.append(f"  the proxy: {r.plan}")
        lines.append("")
    working = [r.name for r in reports if r.ok]
    lines.append(
        f"usable: {', '.join(working)}" if working else "no power source works on this host"
    )
    return "\n".join(lines)


def run_doctor(power_source: str = "auto", json_out: bool = False, calls: int = 100) -> int:
    try:
        reports = probe(
            power_source, {"nvml": nvml_factory, "rapl": rapl_factory}, calls=max(10, calls)
        )
    except ValueError as exc:
        print(f"energy-proxy doctor: {exc}", file=sys.stderr)
        return 2
    if json_out:
        doc: dict[str, Any] = {
            "power_source": power_source,
            "sources": [r.to_dict() for r in reports],
            "usable": [r.name for r in reports if r.ok],
        }
        print(json.dumps(doc, indent=2))
    else:
        print(render(reports, power_source))
    return 0 if any(r.ok for r in reports) else 1
