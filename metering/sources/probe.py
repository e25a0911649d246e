"""What this host can measure, and what each measurement costs (for `energy-proxy doctor`).

Opens the power sources a SPEC names (or that `auto` finds), times every call each makes
(wall time p50/p99, and the calling thread's CPU time, which is what the sampler's budget
is about), finds how often an energy counter moves, reads the power now, checks whether
GPU power limits can be set (for `bench --sweep`), and says what the proxy will do with
each source given those costs. A part that cannot be opened is reported with the reason,
not raised. Sensor I/O only; the command renders the result.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from metering.sources.background import FULL_READ_CPU_BUDGET, ReadSchedule
from metering.sources.base import PowerSource, SourceError, SourceUnavailable
from metering.sources.nvml import (
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_SUPPORTED,
    NvmlError,
    NvmlGpuSource,
)
from metering.sources.nvml_limits import (
    get_power_limit_w,
    power_limit_constraints_w,
    set_power_limit_w,
)
from metering.sources.spec import SourceFactory, parse_power_spec, split_power_spec

SAMPLE_HZ_DEFAULT = 20.0


@dataclass(frozen=True, slots=True)
class CallCost:
    """One kind of call a source makes, timed `calls` times."""

    call: str
    calls: int
    p50_s: float
    p99_s: float
    cpu_p50_s: float  # the calling thread's CPU time per call
    errors: int = 0


@dataclass(slots=True)
class SourceReport:
    name: str
    method: str = ""
    hardware: str = ""
    ok: bool = False
    problem: str = ""  # why it cannot be used (not opened, or its reads fail)
    calls: list[CallCost] = field(default_factory=list)
    counter_period_s: float | None = None
    power_w: float | None = None
    power_limit: str = ""  # GPUs: whether bench --sweep can set power limits
    plan: str = ""  # what the proxy will do with it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def time_call(name: str, fn: Callable[[], object], calls: int) -> CallCost:
    """Call `fn` `calls` times (after one warm-up call); errors are counted, not raised."""
    walls: list[float] = []
    cpus: list[float] = []
    errors = 0
    try:
        fn()
    except (SourceError, NvmlError):
        errors += 1
    for _ in range(calls):
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            fn()
        except (SourceError, NvmlError):
            errors += 1
        walls.append(time.perf_counter() - w0)
        cpus.append(time.thread_time() - c0)
    return CallCost(
        name,
        calls,
        _percentile(walls, 0.5),
        _percentile(walls, 0.99),
        _percentile(cpus, 0.5),
        errors,
    )


def counter_period_s(read_counter: Callable[[], float], max_s: float = 2.0) -> float | None:
    """How often a cumulative counter changes: the median gap between its moves, watching
    it for at most `max_s` seconds (None when it did not move twice)."""
    moves: list[float] = []
    last = read_counter()
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline and len(moves) < 12:
        value = read_counter()
        if value != last:
            moves.append(time.monotonic())
            last = value
        time.sleep(0.002)
    gaps = [b - a for a, b in itertools.pairwise(moves)]
    return statistics.median(gaps) if gaps else None


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} µs"


def _nvml_report(src: NvmlGpuSource, calls: int, sample_hz: float) -> SourceReport:
    session, handle = src._device()
    rep = SourceReport(src.name, src.method, src.hardware, ok=True)
    costs = []
    if src.counter_mode:
        costs.append(time_call(
            "nvmlDeviceGetTotalEnergyConsumption", lambda: session.total_energy_mj(handle), calls
        ))  # fmt: skip
        rep.counter_period_s = counter_period_s(lambda: session.total_energy_mj(handle))
    costs.append(time_call(
        "nvmlDeviceGetFieldValues (instant power)", lambda: session.instant_power_mw(handle),
        4 * calls,
    ))  # fmt: skip
    costs.append(time_call(
        "nvmlDeviceGetPowerUsage", lambda: session.power_usage_mw(handle), 4 * calls
    ))  # fmt: skip
    rep.calls = costs
    try:
        rep.power_w = src.read(time.monotonic()).power_w
    except SourceError as exc:
        rep.ok, rep.problem = False, str(exc)
    rep.power_limit = _power_limit_permission(src)
    fast_s = 1.0 / sample_hz
    if src.counter_mode:
        counter = costs[0]
        schedule = ReadSchedule(fast_s, learn=False, budget=FULL_READ_CPU_BUDGET)
        schedule.period_s = rep.counter_period_s or 0.1
        schedule.observe(0.0, counter.cpu_p50_s, None)
        rep.plan = (
            f"counter read {_fmt_s(counter.p50_s)} (p99 {_fmt_s(counter.p99_s)}): read on "
            f"the sampler thread every {schedule.interval_s:.2f} s, never on a request; "
            f"between reads, instant power every {fast_s * 1e3:.0f} ms carries the energy "
            f"forward"
        )
    else:
        rep.plan = (
            f"no energy counter: power sampled every {fast_s * 1e3:.0f} ms on the sampler "
            "thread and integrated (a 1 s average on some GPUs: less exact)"
        )
    return rep


def _power_limit_permission(src: NvmlGpuSource) -> str:
    try:
        low_w, high_w = power_limit_constraints_w(src)
        now_w = get_power_limit_w(src)
    except (NvmlError, PermissionError) as exc:
        return f"cannot read the power limit: {exc}"
    span = f"{now_w:g} W now, {low_w:g}-{high_w:g} W allowed"
    if os.geteuid() != 0:
        return f"{span}; setting it needs root (bench --sweep skips power limits)"
    try:
        set_power_limit_w(src, now_w)  # the current value again: nothing changes
    except PermissionError:
        return f"{span}; NVML refuses to set it here (no permission)"
    except NvmlError as exc:
        if exc.code in (NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_NO_PERMISSION):
            return f"{span}; setting it is not supported here"
        return f"{span}; setting it failed: {exc}"
    return f"{span}; can be set (bench --sweep can sweep it)"


def _generic_report(src: PowerSource, calls: int, sample_hz: float) -> SourceReport:
    rep = SourceReport(src.name, src.method, str(getattr(src, "hardware", "") or ""), ok=True)
    t = [time.monotonic()]

    def read() -> object:
        t[0] += 1e-3
        return src.read(max(t[0], time.monotonic()))

    cost = time_call(f"{src.name} read", read, calls)
    rep.calls = [cost]
    time.sleep(0.06)  # let a power figure form (RAPL: from two reads over a window)
    try:
        rep.power_w = src.read(time.monotonic() + 0.1).power_w
    except SourceError as exc:
        rep.ok, rep.problem = False, str(exc)
    if cost.errors == cost.calls:
        rep.ok = False
    if getattr(src, "blocking", False):
        schedule = ReadSchedule(1.0 / sample_hz, learn=False, budget=FULL_READ_CPU_BUDGET)
        schedule.observe(0.0, cost.cpu_p50_s, None)
        rep.plan = (
            f"read {_fmt_s(cost.p50_s)}: on the sampler thread every "
            f"{schedule.interval_s * 1e3:.0f} ms, never on a request"
        )
    else:
        rep.plan = f"computed, {_fmt_s(cost.p50_s)}: read at each request boundary"
    if src.method == "cpu-estimate":
        rep.plan += "; an ESTIMATE from CPU utilisation, not a measurement"
    return rep


def probe(
    spec: str,
    factories: Mapping[str, SourceFactory],
    *,
    calls: int = 100,
    sample_hz: float = SAMPLE_HZ_DEFAULT,
) -> list[SourceReport]:
    """A report per source the SPEC names; for `auto`, also one per sensor kind that is
    absent here, saying why. Raises ValueError for a malformed SPEC."""
    reports: list[SourceReport] = []
    parts = split_power_spec(spec)
    kinds = [k for k, _ in parts]
    if "auto" in kinds:
        # Every sensor kind, each on its own, so that one that is absent says why.
        parts = [(k, None) for k in ("nvml", "rapl")] + [p for p in parts if p[0] != "auto"]
    for kind, argument in parts:
        part = kind if argument is None else f"{kind}:{argument}"
        try:
            sources = parse_power_spec(part, start_s=time.monotonic(), factories=factories)
        except SourceUnavailable as exc:
            reports.append(SourceReport(kind, problem=str(exc)))
            continue
        try:
            for src in sources:
                if isinstance(src, NvmlGpuSource):
                    reports.append(_nvml_report(src, calls, sample_hz))
                else:
                    reports.append(_generic_report(src, calls, sample_hz))
        finally:
            for src in sources:
                src.close()
    if "auto" in kinds and not any(r.ok for r in reports):
        try:
            (fallback,) = parse_power_spec("cpu-estimate", start_s=time.monotonic())
        except SourceUnavailable as exc:
            reports.append(SourceReport("cpu-estimate", problem=str(exc)))
        else:
            try:
                reports.append(_generic_report(fallback, calls, sample_hz))
            finally:
                fallback.close()
    return reports
