"""The interface every power source implements.

A source is read synchronously (from the event loop, so a read must take microseconds,
not milliseconds) and returns a cumulative energy counter. Sources that only know power
integrate it themselves, so the ledger sees one shape: joules since the source started.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Domain = Literal["gpu", "cpu", "system"]


class SourceError(Exception):
    """A source could not be read this time. The sampler marks it degraded and keeps going."""


class SourceUnavailable(Exception):
    """A source cannot be used on this machine at all (no sensor, no permission, no driver)."""


@dataclass(frozen=True, slots=True)
class Reading:
    """One read of a source.

    energy_j: cumulative joules since the source was opened; never decreases.
    power_w:  the latest instantaneous (or short-average) power, watts; used for idle
              learning and the power gauge, never integrated by the caller.
    t_s:      the clock time of the read, seconds (the sampler's monotonic clock).
    """

    energy_j: float
    power_w: float
    t_s: float


class PowerSource(Protocol):
    """A sensor or model of power draw.

    name:   unique, bounded label value, e.g. "constant", "cpu-estimate", "nvml:0".
    method: how it measures, one of the x-energy-method values.
    domain: which part of the machine it covers: "gpu", "cpu" (CPU and DRAM) or "system"
            (a whole-box figure such as `constant:W`), for the gpu/cpu split in responses.
    """

    name: str
    method: str
    domain: Domain

    def read(self, now_s: float) -> Reading:
        """Read the source at clock time `now_s`. Raises SourceError on a failed read."""
        ...

    def close(self) -> None:
        """Release the sensor."""
        ...
