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


@pytest.mark.parametrize("phase_s", [0.0, 0.05, 0.099])
def test_a_one_second_average_is_read_as_the_last_second_s_energy(phase_s: float) -> None:
    """No instant field: GetPowerUsage, a one-second mean. Integrating it as if it were
    instant would put the step up half a second late (125 J short at 2.5 s); read as what
    it is, it is not. What is left: the energy a second ago is interpolated between two
    counter reads 0.75 s apart, linearly across the step (up to 43 J high at 2.7 s)."""
    energy_at, power_at = step_power(2.0, 100.0, 600.0)
    nvml = SimulatedNvml(energy_at, power_at, counter_phase_s=phase_s, instant="none")
    gpu = source(nvml)
    got = reads(gpu, nvml, 2.7, full_at={0.75, 1.5, 2.25})
    for t in (2.1, 2.2, 2.4, 2.5, 2.6, 2.7):
        assert got[t] == pytest.approx(energy_at(t), abs=600.0 * 0.08), (t, got[t], energy_at(t))


def test_a_counter_value_is_taken_as_half_an_update_period_old() -> None:
    """The counter holds the energy up to its last move, some instant of the last 100 ms.
    Taken as the energy at the read itself, every counter read fell short by the power
    times that age (35 J on average at 700 W) until the next one; taken as half a period
    old, the estimate right after a counter read is right on average over where the read
    falls in the counter's period (the schedule's reads fall anywhere in it)."""
    watts = 700.0
    errors = []
    for i in range(40):
        phase_s = 0.1 * i / 40
        nvml = SimulatedNvml(
            lambda t: watts * t, lambda t: watts, counter_phase_s=phase_s, counter_period_s=0.1
        )
        gpu = source(nvml)
        for t in (0.75, 1.5):
            nvml.now_s = t
            reported = gpu.read(t).energy_j
        errors.append(reported - watts * 1.5)
    mean_j = sum(errors) / len(errors)
    assert abs(mean_j) < 0.05 * watts * 0.1, errors  # within 3.5 J, where the old fell 35 J short
    # Each read is off by at most half a period of the power (the read's own phase).
    assert all(abs(e) <= watts * 0.05 + 1e-6 for e in errors), errors


def test_a_counter_read_soon_after_the_previous_one_is_taken_as_fresher() -> None:
    """Read 20 ms after the last read, a value that moved was written within those 20 ms:
    its age is taken as half of that, not half a period."""
    watts = 500.0
    nvml = SimulatedNvml(lambda t: watts * t, lambda t: watts, counter_phase_s=0.015)
    gpu = source(nvml)
    for t in (0.70, 0.72):  # the counter moved at 0.715
        nvml.now_s = t
        reported = gpu.read(t).energy_j
    assert reported == pytest.approx(watts * 0.715 + watts * 0.01, abs=1e-6)


def burst_power(t0_s: float, t1_s: float, base_w: float, burst_w: float):
    """`base_w` throughout, `burst_w` from `t0_s` to `t1_s` (a prefill's burst)."""

    def energy_at(t: float) -> float:
        inside = max(0.0, min(t, t1_s) - t0_s)
        return base_w * t + (burst_w - base_w) * inside

    def power_at(t: float) -> float:
        return burst_w if t0_s <= t < t1_s else base_w

    return energy_at, power_at


def test_a_burst_a_second_ago_is_placed_where_the_estimates_put_it() -> None:
    """No instant field: E(now) = E(now - 1 s) + the mean's second. A 40 ms burst at
    1.6 s, between counter values of 1.45 and 2.2 s: a second later, E(now - 1 s) taken
    linearly between those two values spreads the burst's 76 J over the 0.75 s (19 J high
    at 2.6 s, 16 J low at 2.95 s); shaped by what the means told between them (the next
    mean saw the burst), it is placed where it was drawn."""
    energy_at, power_at = burst_power(1.6, 1.64, 100.0, 2_000.0)
    nvml = SimulatedNvml(energy_at, power_at, counter_phase_s=0.0, instant="none")
    gpu = source(nvml)
    got = reads(gpu, nvml, 2.95, full_at={0.75, 1.5, 2.25})
    for t in [t for t in got if 2.5 <= t <= 2.95]:
        assert got[t] == pytest.approx(energy_at(t), abs=6.0), (t, got[t], energy_at(t))


def test_the_power_steps_at_the_boundary_a_sample_was_taken_for() -> None:
    """A prefill's burst starts at a request's start and ends at its first token, and the
    background reader samples 2 ms after each (its nudge). Between the sample before and
    the one just after a boundary, the power is taken to step at the boundary, not to
    ramp between them (a trapezoid put half of the burst's power on the 20 ms before it
    began: 21 J early, on whoever ran then)."""
    energy_at, power_at = burst_power(0.62, 0.652, 100.0, 2_000.0)
    nvml = SimulatedNvml(energy_at, power_at, counter_phase_s=0.0)
    gpu = source(nvml)
    for t in (0.05 * k for k in range(1, 13)):  # samples every 50 ms up to 0.6 s
        nvml.now_s = t
        gpu.read_fast(t)
    for t, boundary_s in ((0.622, 0.62), (0.654, 0.652)):
        nvml.now_s = t
        gpu.step_at_s = boundary_s
        reported = gpu.read_fast(t).energy_j
        assert reported == pytest.approx(energy_at(t), abs=1.0), (t, reported, energy_at(t))
