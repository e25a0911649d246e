"""GPU power limits through NVML, for benchmarks (`energy-proxy bench --power-limits`,
`doctor`): read the range and the current and default limits, set one. Setting needs root;
NVML's refusals become PermissionError / ValueError with the GPU's name."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

from metering.sources.nvml import (
    NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_SUPPORTED,
    DeviceHandle,
    NvmlError,
    NvmlGpuSource,
    NvmlSession,
)

_T = TypeVar("_T")


def _limit_error(source: NvmlGpuSource, what: str, exc: NvmlError) -> Exception:
    if exc.code == NVML_ERROR_NO_PERMISSION:
        return PermissionError(f"{what} of {source.name} needs root: {exc}")
    if exc.code == NVML_ERROR_NOT_SUPPORTED:
        return NvmlError(exc.function, exc.code, f"{what} of {source.name} is not supported")
    return exc


def _ask(source: NvmlGpuSource, what: str, call: Callable[[NvmlSession, DeviceHandle], _T]) -> _T:
    """`call` on `source`'s GPU, NVML's refusal named for `what` (see _limit_error)."""
    session, handle = source._device()
    try:
        return call(session, handle)
    except NvmlError as exc:
        raise _limit_error(source, what, exc) from exc


def power_limit_constraints_w(source: NvmlGpuSource) -> tuple[float, float]:
    """(min, max) power limit, watts, that `source`'s GPU accepts. Raises NvmlError."""
    low_mw, high_mw = _ask(
        source, "reading the power limit range", lambda s, h: s.power_limit_constraints_mw(h)
    )
    return low_mw / 1000.0, high_mw / 1000.0


def get_power_limit_w(source: NvmlGpuSource) -> float:
    """The GPU's current power limit, watts. Raises NvmlError."""
    return _ask(source, "reading the power limit", lambda s, h: s.power_limit_mw(h)) / 1000.0


def default_power_limit_w(source: NvmlGpuSource) -> float:
    """The GPU's default power limit, watts (what to restore after a benchmark)."""
    what = "reading the default power limit"
    return _ask(source, what, lambda s, h: s.default_power_limit_mw(h)) / 1000.0


def set_power_limit_w(source: NvmlGpuSource, watts: float) -> None:
    """Set the GPU's power limit to `watts` (rounded to whole milliwatts).

    Raises ValueError outside power_limit_constraints_w (or not finite), PermissionError
    when NVML refuses for lack of privilege (setting a power limit needs root), NvmlError
    for other failures.
    """
    if not math.isfinite(watts):
        raise ValueError(f"power limit must be a finite number of watts, got {watts!r}")
    low_w, high_w = power_limit_constraints_w(source)
    limit_mw = round(watts * 1000.0)
    if not low_w * 1000.0 <= limit_mw <= high_w * 1000.0:
        raise ValueError(
            f"power limit {watts:g} W is outside what {source.name} accepts: "
            f"{low_w:g} W to {high_w:g} W"
        )
    session, handle = source._device()
    try:
        session.set_power_limit_mw(handle, limit_mw)
    except NvmlError as exc:
        if exc.code == NVML_ERROR_INVALID_ARGUMENT:
            raise ValueError(f"{source.name} refused a power limit of {watts:g} W: {exc}") from exc
        raise _limit_error(source, "setting the power limit", exc) from exc
