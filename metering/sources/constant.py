"""A fixed power draw: `constant:W`.

For demos, tests and loads whose draw is known (a box measured once at the wall). The
energy is exact by construction: power_w x seconds since the source started.
"""

from __future__ import annotations

import math

from metering.sources.base import Domain, Reading


def check_power_w(power_w: float, what: str) -> float:
    """Return `power_w` as a float, or raise ValueError if it is negative, NaN or infinite."""
    value = float(power_w)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"{what} must be a finite number of watts >= 0, got {power_w!r}")
    return value


class ConstantSource:
    """A source that draws `power_w` watts all the time, from clock time `start_s` on."""

    name: str = "constant"
    method: str = "constant"
    domain: Domain = "system"

    def __init__(self, power_w: float, start_s: float) -> None:
        """power_w: watts, finite and >= 0. start_s: clock time (s) the energy counts from."""
        self.power_w = check_power_w(power_w, "constant power")
        self.start_s = float(start_s)

    def read(self, now_s: float) -> Reading:
        """Joules since start_s (0 before it), and the constant power in watts."""
        elapsed_s = max(0.0, now_s - self.start_s)
        return Reading(energy_j=self.power_w * elapsed_s, power_w=self.power_w, t_s=now_s)

    def close(self) -> None:
        """Nothing to release."""

    def __repr__(self) -> str:
        return f"ConstantSource(power_w={self.power_w!r}, start_s={self.start_s!r})"
