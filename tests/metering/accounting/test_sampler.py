"""The sampler over fake sources and a fake clock: boundaries, failures, idle learning."""

from __future__ import annotations

import pytest

from metering.accounting.idle import IdlePower
from metering.accounting.sampler import Sampler
from metering.sources.base import Reading, SourceError
from tests.support.clock import StepClock


class FlakySource:
    """Draws `power_w`; raises while `failing` is set (its counter keeps running)."""

    name = "flaky"
    method = "constant"
    domain = "system"

    def __init__(self, power_w: float) -> None:
        self.power_w = power_w
        self.failing = False
        self.closed = False

    def read(self, now_s: float) -> Reading:
        if self.failing:
            raise SourceError("sensor not answering")
        return Reading(self.power_w * now_s, self.power_w, now_s)

    def close(self) -> None:
        self.closed = True


def test_request_window_is_exact_at_boundaries() -> None:
    clock = StepClock()
    src = FlakySource(50.0)
    sampler = Sampler([src], idle_watts=10.0, clock=clock)
    clock.t_s = 1.0
    ticket, t0 = sampler.start()
    clock.t_s = 1.3
    shares, t1 = sampler.finish(ticket)
    assert (t0, t1) == (1.0, 1.3)
    assert shares[0].energy_j == pytest.approx(50.0 * 0.3)
    assert shares[0].dynamic_j == pytest.approx(40.0 * 0.3)
    ch = sampler.ledger.channels["flaky"]
    assert ch.idle_j == pytest.approx(50.0)  # the first second, nothing in flight


def test_failed_reads_degrade_then_catch_up_without_loss() -> None:
    clock = StepClock()
    src = FlakySource(20.0)
    sampler = Sampler([src], clock=clock)
    clock.t_s = 1.0
    ticket, _ = sampler.start()
    src.failing = True
    clock.t_s = 2.0
    sampler.read_all()
    assert sampler.states[0].ok is False and sampler.methods == []
    src.failing = False
    clock.t_s = 3.0
    shares, _ = sampler.finish(ticket)
    assert sampler.states[0].ok is True
    assert shares[0].energy_j == pytest.approx(40.0)  # the failed second is not lost
    sampler.close()
    assert src.closed


def test_idle_learns_low_percentile() -> None:
    idle = IdlePower()
    assert idle.watts == 0.0 and not idle.learnt
    for w in [100.0] * 5:
        idle.observe(w, idle=False)
    assert idle.watts == 100.0  # lowest seen until an idle sample exists
    for w in [30.0, 31.0, 29.0, 200.0, 30.5] * 10:
        idle.observe(w, idle=True)
    assert 29.0 <= idle.watts <= 30.5 and idle.learnt
    fixed = IdlePower(12.0)
    fixed.observe(500.0, idle=True)
    assert fixed.watts == 12.0
    with pytest.raises(ValueError):
        IdlePower(-1.0)
