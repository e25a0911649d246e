"""What the NVML source reports between two reads of its counter (read every 0.75 s on an
H100), over a simulated GPU in virtual time: the proxy's own NvmlGpuSource, unchanged."""

from __future__ import annotations

import pytest

from metering.sources.nvml import NvmlGpuSource
from tests.support.fakes.gpu_sensor import SimulatedNvml


def step_power(t0_s: float, low_w: float, high_w: float):
    def energy_at(t: float) -> float:
        return low_w * min(t, t0_s) + high_w * max(0.0, t - t0_s)

    def power_at(t: float) -> float:
        return high_w if t >= t0_s else low_w

    return energy_at, power_at


def reads(gpu: NvmlGpuSource, nvml: SimulatedNvml, until_s: float, *, full_at: set[float]):
    """Fast reads every 50 ms, full reads (the counter) at `full_at`: {t: reported J}."""
    out = {}
    for k in range(1, round(until_s / 0.05) + 1):
        t = round(k * 0.05, 6)
        nvml.now_s = t
        reading = gpu.read(t) if t in full_at else gpu.read_fast(t)
        out[t] = reading.energy_j
    return out


def source(nvml: SimulatedNvml) -> NvmlGpuSource:
    gpu = NvmlGpuSource(nvml, 0, start_s=0.0)  # type: ignore[arg-type]
    gpu.interpolation_cap_s = 0.85  # as the background reader sets it: its gap, and a period
    return gpu


@pytest.mark.parametrize("spike_s", [0.2, 0.5, 0.65])
def test_a_spike_between_counter_reads_is_placed_when_it_was_drawn(spike_s: float) -> None:
    energy_at, power_at = step_power(spike_s, 100.0, 600.0)
    nvml = SimulatedNvml(energy_at, power_at, counter_phase_s=0.0)
    gpu = source(nvml)
    got = reads(gpu, nvml, 0.7, full_at=set())
    for t, reported in got.items():
        # Never ahead of the truth by more than one sample of the higher power, and never
        # the latest power carried back over the whole time since the counter was read
        # (which said 600 W x 0.55 s = 330 J at 0.55 s for a spike at 0.5 s: 3 times it).
        assert reported <= energy_at(t) + 600.0 * 0.05 + 1e-6, (t, reported, energy_at(t))
        assert reported >= energy_at(t) - 600.0 * 0.05 - 1e-6, (t, reported, energy_at(t))


def test_the_counter_still_floors_and_snaps_the_estimate() -> None:
    energy_at, power_at = step_power(0.3, 100.0, 600.0)
    nvml = SimulatedNvml(energy_at, power_at, counter_phase_s=0.0)
    gpu = source(nvml)
    got = reads(gpu, nvml, 2.0, full_at={0.75, 1.5})
    values = [got[t] for t in sorted(got)]
    assert values == sorted(values)  # never backwards
    # At a counter read the report is at least the counter (its value at its last move).
    assert got[1.5] >= energy_at(1.5) - 600.0 * 0.1


def test_a_one_second_average_is_read_as_the_last_second_s_energy() -> None:
    """No instant field: GetPowerUsage, a one-second mean. Integrating it as if it were
    instant would put the step up half a second late; read as what it is, it is not."""
    energy_at, power_at = step_power(2.0, 100.0, 600.0)
    nvml = SimulatedNvml(energy_at, power_at, counter_phase_s=0.0, instant="none")
    gpu = source(nvml)
    got = reads(gpu, nvml, 2.7, full_at={0.75, 1.5, 2.25})
    for t in (2.1, 2.2, 2.4, 2.5, 2.6, 2.7):
        assert got[t] == pytest.approx(energy_at(t), abs=600.0 * 0.06), (t, got[t], energy_at(t))
