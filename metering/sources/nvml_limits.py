"""GPU power limits through NVML, for benchmarks (`energy-proxy bench --power-limits`,
`doctor`): read the range and the current and default limits, set one. Setting needs root;
NVML's refusals become PermissionError / ValueError with the GPU's name."""

from __future__ import annotations

import math

from metering.sources.nvml import (
    NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_SUPPORTED,
    NvmlError,
    NvmlGpuSource,
)


def _limit_error(source: NvmlGpuSource, what: str, exc: NvmlError) -> Exception:
    if exc.code == NVML_ERROR_NO_PERMISSION:
        return PermissionError(f"{what} of {source.name} needs root: {exc}")
    if exc.code == NVML_ERROR_NOT_SUPPORTED:
        return NvmlError(exc.function, exc.code, f"{what} of {source.name} is not supported")
    return exc


def power_limit_constraints_w(source: NvmlGpuSource) -> tuple[float, float]:
    """(min, max) power limit, watts, that `source`'s GPU accepts. Raises NvmlError."""
    session, handle = source._device()
    try:
        low_mw, high_mw = session.power_limit_constraints_mw(handle)
    except NvmlError as exc:
        raise _limit_error(source, "reading the power limit range", exc) from exc
    return low_mw / 1000.0, high_mw / 1000.0


def get_power_limit_w(source: NvmlGpuSource) -> float:
    """The GPU's current power limit, watts. Raises NvmlError."""
    session, handle = source._device()
    try:
        return session.power_limit_mw(handle) / 1000.0
    except NvmlError as exc:
        raise _limit_error(source, "reading the power limit", exc) from exc


def default_power_limit_w(source: NvmlGpuSource) -> float:
    """The GPU's default power limit, watts (what to restore after a benchmark)."""
    session, handle = source._device()
    try:
        return session.default_power_limit_mw(handle) / 1000.0
    except NvmlError as exc:
        raise _limit_error(source, "reading the default power limit", exc) from exc


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
