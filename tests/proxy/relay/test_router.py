"""The router (proxy/relay/router.py): each backend's figures as the policies see them."""

from __future__ import annotations

import pytest

from backends.backend import Backend, BackendConfig
from backends.own_metrics import OwnMetrics
from metering.accounting.cost_model import Coefficients, CostFit
from metering.carbon.intensity import StaticIntensity
from metering.meter import Meter, Plan
from metering.sources.constant import ConstantSource
from proxy.relay.router import Batch, Router, held_by_all, output_limit, queued_at
from tests.support.clock import StepClock

MODEL = "m"


def fleet(n: int = 2) -> tuple[list[Backend], Meter, StepClock]:
    clock = StepClock()
    backends = [Backend(BackendConfig(f"b{i}", f"http://127.0.0.1:{9000 + i}")) for i in range(n)]
    for b in backends:
        b.state.ready = True
    meter = Meter.build(
        [ConstantSource(100.0, start_s=clock())],
        [Plan(b.name) for b in backends],
        StaticIntensity(100.0),
        clock=clock,
    )
    return backends, meter, clock


def fitted(meter: Meter, name: str, coefs: Coefficients, rel_se: float = 0.02) -> None:
    """`name`'s cost model as a settled fit that identified every coefficient."""
    fit: CostFit = meter.lane(name).fit
    fit.coefficients = coefs
    fit.fitted_at_s, fit.intervals_used, fit.band_rel = 1.0, 200, 0.05
    fit.std_errors = (
        coefs.fixed_w * rel_se,
        coefs.prefill_j_per_token * rel_se,
        coefs.decode_j_per_token * rel_se,
    )
    fit.identified = (True, True, True)
    assert fit.trusted


CHEAP = Coefficients(200.0, 0.004, 0.004)
DEAR = Coefficients(300.0, 0.006, 0.006)


def test_energy_takes_the_backend_whose_fit_is_cheaper() -> None:
    backends, meter, _ = fleet()
    fitted(meter, "b0", DEAR)
    fitted(meter, "b1", CHEAP)
    router = Router(meter, policy="energy", draw=lambda: 0.9)
    route = router.pick(backends, MODEL, 100.0, 64.0)
    assert (route.backend.name, route.reason) == ("b1", "lowest")
    assert route.header() == (b"x-energy-route", b"policy=energy; backend=b1; reason=lowest")
    assert route.label == "energy/lowest"


def test_loose_fits_tie_and_share_by_load() -> None:
    backends, meter, _ = fleet()
    fitted(meter, "b0", CHEAP, rel_se=0.5)
    fitted(meter, "b1", DEAR, rel_se=0.5)
    backends[0].traffic.inflight = 3
    router = Router(meter, policy="energy", draw=lambda: 0.9)
    route = router.pick(backends, MODEL, 100.0, 64.0)
    assert (route.backend.name, route.reason) == ("b1", "tie")


def test_on_the_same_defaults_energy_ties_and_carbon_follows_the_grid() -> None:
    backends, meter, _ = fleet()
    assert held_by_all([meter.lane(b.name).fit for b in backends]) == (True, True, True)
    zones = {"b0": StaticIntensity(400.0), "b1": StaticIntensity(40.0)}
    energy = Router(meter, policy="energy", intensities=zones, draw=lambda: 0.9)
    assert energy.pick(backends, MODEL, 100.0, 64.0).reason == "tie"
    carbon = Router(meter, policy="carbon", intensities=zones, draw=lambda: 0.9)
    route = carbon.pick(backends, MODEL, 100.0, 64.0)
    assert (route.backend.name, route.reason) == ("b1", "lowest")


def test_a_fitted_backend_against_one_on_defaults_is_not_told_apart_by_the_prior() -> None:
    backends, meter, _ = fleet()
    fitted(meter, "b0", Coefficients(250.0, 0.005, 0.005))
    assert held_by_all([meter.lane(b.name).fit for b in backends]) == (False, False, False)
    router = Router(meter, policy="energy", draw=lambda: 0.9)
    # The defaults' spread (a factor of 4) covers b0's fit: equal, the least loaded.
    backends[0].traffic.inflight = 2
    route = router.pick(backends, MODEL, 100.0, 64.0)
    assert (route.backend.name, route.reason) == ("b1", "tie")


def test_busier_is_not_cheaper_in_the_ranking() -> None:
    backends, meter, clock = fleet()
    fitted(meter, "b0", CHEAP)
    fitted(meter, "b1", CHEAP)
    router = Router(meter, policy="energy", draw=lambda: 0.9)
    # b0 has run eight at once for a minute, b1 one: b0's own figure is lower ...
    for b, n in ((backends[0], 8), (backends[1], 1)):
        b.traffic.inflight = n - 1
        router._count(b, +1)
    clock.t_s += 60.0
    for b in backends:
        b.traffic.inflight = 0
        router._count(b, 0)
    assert router.batch_of("b0") == pytest.approx(8.0)
    assert router.batch_of("b1") == pytest.approx(1.0)
    assert router.estimate("b0").energy.joules < router.estimate("b1").energy.joules
    # ... but both are ranked at one batch: equal costs tie.
    assert router.pick(backends, MODEL, 100.0, 64.0).reason == "tie"


def test_the_batch_is_the_time_weighted_mean_while_busy() -> None:
    batch = Batch()
    batch.change(0.0, 2.0)
    batch.change(1.0, 4.0)
    batch.change(2.0, 0.0)  # idle from here: not counted
    batch.change(50.0, 1.0)
    assert batch.mean == pytest.approx(3.0, rel=0.02)
    assert Batch().mean == 1.0


def test_exploration_is_drawn_only_by_the_measured_policies() -> None:
    backends, meter, _ = fleet()
    fitted(meter, "b0", CHEAP)
    fitted(meter, "b1", DEAR)
    draws = iter([0.01, 0.03, 0.9])
    router = Router(meter, policy="energy", draw=lambda: next(draws))
    got = [router.pick(backends, MODEL, 100.0, 64.0) for _ in range(3)]
    assert [(r.backend.name, r.reason) for r in got] == [
        ("b1", "explore"), ("b1", "explore"), ("b0", "lowest"),
    ]  # fmt: skip
    first = Router(meter, policy="first", draw=lambda: pytest.fail("first draws nothing"))
    assert first.pick(backends, MODEL, 100.0, 64.0).backend.name == "b0"


def test_a_per_model_policy_beats_the_default() -> None:
    backends, meter, _ = fleet()
    router = Router(meter, policy="first", per_model={"big": "least-loaded"})
    backends[0].traffic.inflight = 5
    assert router.pick(backends, "small", 10.0, None).backend.name == "b0"
    assert router.pick(backends, "big", 10.0, None).backend.name == "b1"


def test_the_output_limit_a_request_asks_for() -> None:
    assert output_limit({"max_tokens": 64}) == 64.0
    assert output_limit({"max_completion_tokens": 32, "max_tokens": 64}) == 32.0
    assert output_limit({"max_output_tokens": 16}) == 16.0
    for bad in ({}, {"max_tokens": True}, {"max_tokens": "9"}, {"max_tokens": -1}):
        assert output_limit(bad) is None


def test_one_shown_waiting_while_it_runs_fewer_than_it_can_is_not_a_queue() -> None:
    assert queued_at(running=9, waiting=1, most=16) == 0.0  # joins the next step
    assert queued_at(running=9, waiting=50, most=16) == 50.0  # out of KV cache: a queue
    assert queued_at(running=16, waiting=3, most=16) == 3.0
    assert queued_at(running=4, waiting=2, most=None) == 2.0  # nothing known: a queue
    assert queued_at(running=4, waiting=None, most=16) is None


def test_a_backend_shown_waiting_between_steps_stays_allowed() -> None:
    backends, meter, _ = fleet()
    fitted(meter, "b0", CHEAP)
    fitted(meter, "b1", DEAR)
    router = Router(meter, policy="energy", draw=lambda: 0.9)
    cheap = backends[0]
    cheap.state.own = OwnMetrics(inflight=16, waiting=0)  # it has run 16 at once
    assert router.pick(backends, MODEL, 100.0, 64.0).backend is cheap
    cheap.state.own = OwnMetrics(inflight=9, waiting=1)  # one arrived between two steps
    assert router.pick(backends, MODEL, 100.0, 64.0).backend is cheap
    cheap.state.own = OwnMetrics(inflight=16, waiting=2)  # full, and two wait: a queue
    route = router.pick(backends, MODEL, 100.0, 64.0)
    assert (route.backend.name, route.reason) == ("b1", "lowest")


def test_a_queue_the_guard_sees_has_the_gauges_read_again_soon() -> None:
    backends, meter, _ = fleet()
    woken: list[str] = []
    meter.on_gauges_wanted = woken.append
    router = Router(meter, policy="least-loaded")
    backends[0].state.own = OwnMetrics(inflight=4, waiting=0)
    router.pick(backends, MODEL, 10.0, None)
    assert woken == []
    backends[0].state.own = OwnMetrics(inflight=4, waiting=3)
    assert router.pick(backends, MODEL, 10.0, None).backend.name == "b1"
    assert woken == ["b0"]
