"""An NVML session over a simulated GPU's energy, in virtual time, as an H100 reports it.

`SimulatedNvml` stands where metering.sources.nvml.NvmlSession stands, so the proxy's own
NvmlGpuSource (its counter estimate, its power samples) runs unchanged over it. What it
reports, from the truth `energy_at(t)` (cumulative joules) and `power_at(t)` (watts now):

- the energy counter (mJ) moves only every `counter_period_s` (100 ms on an H100), at a
  phase of its own: between moves it holds the energy of its last move;
- the instant-power field is the power now (`instant="exact"`), or a one-second average
  (`instant="1s-average"`, what nvmlDeviceGetPowerUsage gives on Hopper), or absent
  (`instant="none"`: the source falls back to GetPowerUsage, the one-second average);
- the caller sets `now_s` before each call (the harness's virtual clock).

What the calls cost (3 ms for the counter, microseconds for power) is for the harness to
model: it decides when the background reader reads, as the real schedule would.
"""

from __future__ import annotations

import math
from collections.abc import Callable

AVERAGE_WINDOW_S = 1.0


class SimulatedNvml:
    def __init__(
        self,
        energy_at: Callable[[float], float],
        power_at: Callable[[float], float],
        *,
        counter_period_s: float = 0.1,
        counter_phase_s: float = 0.037,
        instant: str = "exact",
    ) -> None:
        if instant not in ("exact", "1s-average", "none"):
            raise ValueError(f"instant must be exact, 1s-average or none, not {instant!r}")
        self.energy_at = energy_at
        self.power_at = power_at
        self.counter_period_s = counter_period_s
        self.counter_phase_s = counter_phase_s
        self.instant = instant
        self.now_s = 0.0
        self.counter_reads = 0
        self.refs = 0

    # --- the session's bookkeeping -----------------------------------------------------

    def acquire(self) -> None:
        self.refs += 1

    def release(self) -> None:
        self.refs -= 1

    def device_handle(self, index: int) -> int:
        return index

    def device_name(self, handle: int) -> str:
        return "Simulated H100"

    def device_uuid(self, handle: int) -> str:
        return f"GPU-sim-{handle}"

    # --- what the GPU reports ------------------------------------------------------------

    def _last_move_s(self) -> float:
        p, phase = self.counter_period_s, self.counter_phase_s
        return math.floor((self.now_s - phase) / p) * p + phase

    def total_energy_mj(self, handle: int) -> int:
        self.counter_reads += 1
        return int(1000.0 * self.energy_at(max(0.0, self._last_move_s())))

    def _average_w(self) -> float:
        t1 = self.now_s
        t0 = t1 - AVERAGE_WINDOW_S
        return (self.energy_at(t1) - self.energy_at(max(0.0, t0))) / AVERAGE_WINDOW_S

    def instant_power_mw(self, handle: int) -> float | None:
        if self.instant == "none":
            return None
        if self.instant == "1s-average":
            return 1000.0 * self._average_w()
        return 1000.0 * self.power_at(self.now_s)

    def power_usage_mw(self, handle: int) -> int:
        return int(1000.0 * self._average_w())
