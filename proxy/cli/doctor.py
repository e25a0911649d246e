"""`energy-proxy doctor`: what this host can measure and what it costs, before trusting it.

For each power source (those `--power-source` names; `auto`: every sensor kind, absent
ones with the reason): its method and hardware, each call it makes timed (wall p50/p99 and
CPU), how often its energy counter moves, the power now, whether GPU power limits can be
set (for `bench --sweep`), and what the proxy will do with it. Exit 0 when at least one
source works, 1 when none does, 2 for a malformed SPEC. `--json` prints the same as JSON.

`--proxy URL` also asks a running proxy (its `/readyz`) what each backend's split rests
on: its cost model (the coefficients, fitted or the defaults, how many intervals, the
residual, how old), the queue capacity and where it came from, and how many answers
carried the backend's own timings. A proxy that cannot be read makes the exit code 1.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any

import httpx

from metering.carbon.sci import embodied_for_host
from metering.sources.nvml import nvml_factory
from metering.sources.probe import SourceReport, probe
from metering.sources.rapl import rapl_factory
from metering.store.postgres import redact
from proxy.observe.startup import SourceLine, figures_of, startup_line
from proxy.settings import ConfigError, load_settings


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


READYZ_TIMEOUT_S = 5.0


def read_cost_models(proxy_url: str) -> tuple[list[dict[str, Any]], str | None]:
    """Each backend of the proxy at `proxy_url` with its cost model (from `/readyz`),
    or why it could not be read."""
    url = proxy_url.rstrip("/") + "/readyz"
    try:
        doc = httpx.get(url, timeout=READYZ_TIMEOUT_S).json()
    except (httpx.HTTPError, ValueError) as exc:
        return [], f"could not read {url}: {exc}"
    backends = doc.get("backends") if isinstance(doc, dict) else None
    if not isinstance(backends, list):
        return [], f"{url} answered no backends list (is this an energy-proxy?)"
    return [b for b in backends if isinstance(b, dict)], None


def _num(value: Any) -> float:
    """A figure from another process's JSON, as a float (NaN where it is not a number)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else float("nan")


# term, label, unit, scale, decimals: as `doctor --proxy` prints each coefficient
_TERMS = (
    ("fixed_w", "fixed", "W", 1.0, 1),
    ("prefill_j_per_token", "prefill", "mJ/token", 1e3, 2),
    ("decode_j_per_token", "decode", "mJ/token", 1e3, 2),
)


def _coefficient(m: dict[str, Any], term: tuple[str, str, str, float, int]) -> str:
    """`fixed 280.0 ± 5.2 W`, or `... (not identified: the default)` where the intervals
    cannot pin it down."""
    key, label, unit, scale, digits = term
    value = _num(m.get(key)) * scale
    errors, known = m.get("std_errors") or {}, m.get("identified") or {}
    err = errors.get(key) if isinstance(errors, dict) else None
    text = f"{label} {value:.{digits}f}"
    if isinstance(err, int | float) and not isinstance(err, bool):
        text += f" ± {err * scale:.{digits}f}"
    text += f" {unit}"
    if m.get("fitted_at") and isinstance(known, dict) and not known.get(key):
        text += " (not identified: the default)"
    return text


def render_cost_models(backends: list[dict[str, Any]], proxy_url: str, now_s: float) -> str:
    lines = [f"the split at {proxy_url}:"]
    for b in backends:
        m = b.get("cost_model")
        if not isinstance(m, dict):
            lines.append(f"  {b.get('name')}: no cost model (attribution is not `model`?)")
            continue
        fitted_at = _num(m.get("fitted_at"))
        age = f"fitted {now_s - fitted_at:.0f} s ago" if fitted_at > 0 else "never fitted"
        lines.append(
            f"  {b.get('name')}  {m.get('version')} {m.get('in_use')} ({age}, "
            f"{m.get('intervals')} intervals, residual {_num(m.get('band_rel')):.0%})"
        )
        lines.append("    " + ", ".join(_coefficient(m, term) for term in _TERMS))
        capacity = m.get("queue_capacity")
        lines.append(
            f"    queue capacity {capacity if capacity is not None else 'none known'} "
            f"({m.get('queue_capacity_source')}); {m.get('timed_requests')} answers carried "
            "the backend's own timings"
        )
        chunk = m.get("prefill_chunk_tokens")
        lines.append(
            "    prefill "
            + ("a prompt a step" if chunk is None else f"in chunks of {_num(chunk):.0f} tokens")
            + f" ({m.get('prefill_chunk_source', 'none')})"
        )
    return "\n".join(lines)


def serve_figures(reports: list[SourceReport], power_source: str) -> tuple[str, dict[str, Any]]:
    """The line `serve` would print at its start with these sources and this host's
    settings (ENERGY_PROXY_* and ENERGY_PROXY_CONFIG), and its embodied figure; or what is
    wrong with the settings."""
    try:
        settings = load_settings({"power_source": power_source}, os.environ)
    except ConfigError as exc:
        return f"energy-proxy: {exc}", {}
    working = [r for r in reports if r.ok]
    embodied = embodied_for_host(
        sum(1 for r in working if r.method.startswith("nvml")),
        settings.embodied_kgco2eq,
        settings.lifespan_years,
    )
    db = settings.db
    figures = figures_of(
        settings,
        sources=[SourceLine(r.name, r.method, r.hardware) for r in working],
        embodied=embodied.basis,
        store=redact(db) if db.startswith(("postgresql:", "postgres:")) else db,
        request_log=settings.request_log,
    )
    return startup_line(figures), embodied.to_dict()


def run_doctor(
    power_source: str = "auto",
    json_out: bool = False,
    calls: int = 100,
    proxy_url: str | None = None,
) -> int:
    try:
        reports = probe(
            power_source, {"nvml": nvml_factory, "rapl": rapl_factory}, calls=max(10, calls)
        )
    except ValueError as exc:
        print(f"energy-proxy doctor: {exc}", file=sys.stderr)
        return 2
    backends, problem = read_cost_models(proxy_url) if proxy_url else ([], None)
    line, embodied = serve_figures(reports, power_source)
    if json_out:
        doc: dict[str, Any] = {
            "power_source": power_source,
            "sources": [r.to_dict() for r in reports],
            "usable": [r.name for r in reports if r.ok],
            "serve_would_say": line,
            "embodied": embodied,
        }
        if proxy_url:
            doc["proxy"] = {
                "url": proxy_url,
                "cost_models": {b.get("name"): b.get("cost_model") for b in backends},
                **({"error": problem} if problem else {}),
            }
        print(json.dumps(doc, indent=2))
    else:
        print(render(reports, power_source))
        print()
        print("`energy-proxy serve` with these sources and this host's settings would start with:")
        print(line)
        if proxy_url:
            print()
            print(problem or render_cost_models(backends, proxy_url, time.time()))
    if problem:
        print(f"energy-proxy doctor: {problem}", file=sys.stderr)
        return 1
    return 0 if any(r.ok for r in reports) else 1
