"""The meter facade over constant sources and a stepped clock: what the relay relies on.

Every figure is checked against what the sources drew, computed here by hand (watts x
seconds), never against the meter's own arithmetic.
"""

from __future__ import annotations

import pytest

from metering.accounting.report import Timings, Tokens
from metering.carbon.intensity import StaticIntensity
from metering.meter import Meter, Plan
from metering.sources.constant import ConstantSource
from tests.support.clock import StepClock


def source(name: str, power_w: float, *, domain: str = "system", gpu: int | None = None):
    s = ConstantSource(power_w, 0.0)
    s.name = name
    s.domain = domain  # type: ignore[assignment]
    if gpu is not None:
        s.gpu_index = gpu  # type: ignore[attr-defined]
    return s


def close(meter: Meter, m, rid: str, *, answered: bool = True):
    return meter.close(
        m,
        answered=answered,
        request_id=rid,
        model="m",
        category="other",
        tokens=Tokens(10, 5, "backend"),
    )


PAYLOAD = {"model": "m", "messages": [{"role": "user", "content": "hello " * 200}]}


@pytest.mark.parametrize("mode", ["model", "queue", "tokens", "equal"])
@pytest.mark.parametrize("power_w", [3.0, 350.0, 7000.0])
def test_overlapping_requests_share_exactly_what_was_drawn(mode: str, power_w: float) -> None:
    clock = StepClock()
    meter = Meter.build(
        [source("box", power_w)],
        [Plan("b")],
        StaticIntensity(400.0),
        clock=clock,
        attribution=mode,
        idle_watts=0.0,
    )
    clock.t_s = 1.0
    a = meter.open("b", PAYLOAD, stream=True)
    clock.t_s = 1.5
    b = meter.open("b", PAYLOAD, stream=False)
    clock.t_s = 2.0
    meter.first_token(a)
    clock.t_s = 3.0
    ra = close(meter, a, "a")
    clock.t_s = 4.25
    rb = close(meter, b, "b")
    # From 1.0 to 4.25 something was in flight: all of it goes to the two requests.
    assert ra.energy_j + rb.energy_j == pytest.approx(power_w * 3.25, rel=1e-9)
    # b ran alone from 3.0 to 4.25, and a alone from 1.0 to 1.5.
    assert ra.energy_j >= power_w * 0.5 - 1e-9
    assert rb.energy_j >= power_w * 1.25 - 1e-9
    assert (ra.duration_s, rb.duration_s) == (pytest.approx(2.0), pytest.approx(2.75))
    assert ra.attribution == mode
    assert ra.method == "constant"
    # Operational carbon is the energy at the static intensity.
    assert ra.co2eq_g == pytest.approx(ra.energy_j / 3.6e6 * 400.0)


def test_close_is_once_whatever_comes_after() -> None:
    clock = StepClock()
    meter = Meter.build([source("box", 100.0)], [Plan("b")], StaticIntensity(0.0), clock=clock)
    clock.t_s = 1.0
    m = meter.open("b", PAYLOAD, stream=False)
    clock.t_s = 2.0
    first = close(meter, m, "x")
    clock.t_s = 9.0
    again = close(meter, m, "y", answered=False)
    assert again is first
    assert first.energy_j == pytest.approx(100.0)
    # The second close did not take the seven later seconds from anyone: they are idle.
    ch = meter.sampler.ledger.channels["box"]
    meter.sampler.read_all()
    assert ch.idle_j == pytest.approx(100.0 * 8.0)


def test_a_serial_backend_holds_the_second_request_waiting_then_admits_it() -> None:
    clock = StepClock()
    meter = Meter.build([source("box", 60.0)], [Plan("one")], StaticIntensity(0.0), clock=clock)
    clock.t_s = 1.0
    a = meter.open("one", PAYLOAD, stream=True, serial=True)
    b = meter.open("one", PAYLOAD, stream=True, serial=True)
    assert meter.lane("one").queue.capacity == 1
    assert a.flight.weight > 0 and b.flight.weight == 0.0
    clock.t_s = 3.0
    ra = close(meter, a, "a")
    assert b.flight.weight > 0  # admitted in a's place
    clock.t_s = 4.0
    rb = close(meter, b, "b")
    # a ran alone for its two seconds; b waited at no cost, then ran its one.
    assert ra.energy_j == pytest.approx(120.0)
    assert rb.energy_j == pytest.approx(60.0)


def test_learned_capacity_sends_the_newest_prefill_back_to_waiting() -> None:
    clock = StepClock()
    meter = Meter.build([source("box", 10.0)], [Plan("v")], StaticIntensity(0.0), clock=clock)
    clock.t_s = 1.0
    flights = [meter.open("v", PAYLOAD, stream=True) for _ in range(3)]
    assert all(m.flight.weight > 0 for m in flights)
    # The backend says two run and one waits: the newest goes back to waiting.
    meter.learn("v", 2, 1)
    assert meter.lane("v").queue.capacity == 2
    assert [m.flight.weight > 0 for m in flights] == [True, True, False]
    clock.t_s = 2.0
    reports = [close(meter, m, str(i)) for i, m in enumerate(flights)]
    assert sum(r.energy_j for r in reports) == pytest.approx(10.0)
    assert reports[2].energy_j == pytest.approx(0.0, abs=1e-9)  # it waited, at no cost


def test_learn_without_counts_changes_nothing() -> None:
    clock = StepClock()
    meter = Meter.build([source("box", 10.0)], [Plan("v")], StaticIntensity(0.0), clock=clock)
    m = meter.open("v", PAYLOAD, stream=True)
    before = m.flight.weight
    meter.learn("v", None, None)
    assert meter.lane("v").queue.capacity is None
    assert m.flight.weight == before


@pytest.mark.parametrize("mode", ["model", "queue"])
def test_first_token_ends_prefill_weight(mode: str) -> None:
    clock = StepClock()
    meter = Meter.build(
        [source("box", 10.0)], [Plan("v")], StaticIntensity(0.0), clock=clock, attribution=mode
    )
    m = meter.open("v", PAYLOAD, stream=True)
    assert not m.decoding
    prefill = m.flight.weight
    meter.first_token(m)
    assert m.decoding
    decode = m.flight.weight
    # Prefill carries the prompt's work (~300 tokens here), a decode step one token's.
    assert prefill > 50 * decode if mode == "model" else prefill == 1.0 + 300 / 100
    if mode == "model":
        price = meter.lane("v").queue.price
        assert decode == price.decode_j_per_step and m.flight.eq == 1.0
    else:
        assert decode == 1.0 and m.flight.eq == 0.0
    meter.first_token(m)  # a second call is harmless
    assert m.flight.weight == decode


def test_backends_on_their_own_gpus_share_only_those_and_the_host() -> None:
    clock = StepClock()
    sources = [
        source("gpu0", 300.0, domain="gpu", gpu=0),
        source("gpu1", 200.0, domain="gpu", gpu=1),
        source("cpu", 40.0, domain="cpu"),
    ]
    meter = Meter.build(
        sources,
        [Plan("left", gpus=[0]), Plan("right", gpus=[1])],
        StaticIntensity(0.0),
        clock=clock,
        idle_watts=0.0,
    )
    assert meter.lane("left").gpu_share == pytest.approx(0.5)
    clock.t_s = 1.0
    a = meter.open("left", PAYLOAD, stream=False)
    b = meter.open("right", PAYLOAD, stream=False)
    clock.t_s = 3.0
    ra, rb = close(meter, a, "a"), close(meter, b, "b")
    assert ra.gpu_j == pytest.approx(600.0)  # all of GPU 0, nothing of GPU 1
    assert rb.gpu_j == pytest.approx(400.0)
    assert ra.cpu_j == pytest.approx(40.0) and rb.cpu_j == pytest.approx(40.0)  # halves
    assert ra.embodied_g > 0


def test_an_unplanned_backend_draws_from_every_source() -> None:
    clock = StepClock()
    meter = Meter.build(
        [source("gpu0", 100.0, domain="gpu", gpu=0), source("cpu", 10.0, domain="cpu")],
        [Plan("known")],
        StaticIntensity(0.0),
        clock=clock,
    )
    lane = meter.lane("surprise")
    assert set(lane.channels) == {"gpu0", "cpu"}
    clock.t_s = 1.0
    m = meter.open("surprise", PAYLOAD, stream=False)
    clock.t_s = 2.0
    r = close(meter, m, "s")
    assert r.energy_j == pytest.approx(110.0)


def test_hardware_names_every_source_and_method() -> None:
    meter = Meter.build(
        [source("gpu0", 1.0, domain="gpu", gpu=0), source("cpu", 1.0, domain="cpu")],
        [Plan("b")],
        StaticIntensity(0.0),
        clock=StepClock(),
    )
    assert meter.hardware() == "gpu0 (constant), cpu (constant)"


def test_an_unplanned_backend_s_finished_work_does_not_pile_up() -> None:
    clock = StepClock()
    meter = Meter.build([source("box", 10.0)], [Plan("known")], StaticIntensity(0.0), clock=clock)
    for i in range(5):
        clock.t_s = float(i)
        close(meter, meter.open("surprise", PAYLOAD, stream=False), f"s{i}")
    assert len(meter.lane("surprise").pending_work) == 5
    meter.sampler.tick()
    assert meter.lane("surprise").pending_work == []


def test_backend_timings_place_a_requests_work_for_the_fit() -> None:
    # The backend said: 2 s queued, 0.5 s prefill, 1.5 s decode, of its 4 s in flight: the
    # fit gets its prefill at 3.0-3.5 s and its decode at 3.5-5.0 s. Without timings (not
    # streamed: no first token) the proxy's own view starts its work when it was sent.
    clock = StepClock()
    meter = Meter.build(
        [source("box", 100.0)], [Plan("b")], StaticIntensity(400.0), clock=clock, idle_watts=0.0
    )
    lane = meter.lane("b")
    clock.t_s = 1.0
    timed = meter.open("b", PAYLOAD, stream=False)
    untimed = meter.open("b", PAYLOAD, stream=False)
    clock.t_s = 5.0
    r = meter.close(
        timed, answered=True, request_id="t", model="m", category="other",
        tokens=Tokens(10, 5, "backend"), timings=Timings(2.0, 0.5, 1.5),
    )  # fmt: skip
    assert r.basis.endswith("; timings backend")
    assert lane.pending_work[-1] == (3.0, 3.5, 5.0, 10.0, 5)
    r2 = close(meter, untimed, "u")
    assert r2.basis.endswith("; timings proxy")
    assert lane.pending_work[-1] == (1.0, None, 5.0, 10.0, 5)
    assert lane.timed == 1
    # Timings longer than the request was in flight are clipped to it.
    clock.t_s = 6.0
    odd = meter.open("b", PAYLOAD, stream=False)
    clock.t_s = 7.0
    meter.close(
        odd, answered=True, request_id="o", model="m", category="other",
        tokens=Tokens(10, 5, "backend"), timings=Timings(None, 30.0, 60.0),
    )  # fmt: skip
    assert lane.pending_work[-1][:3] == (6.0, 6.0, 7.0)
