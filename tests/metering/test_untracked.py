"""Work the proxy did not send: the backend's gauges show more running than the proxy has
in flight, and the energy of that work goes to the backend's untracked account, not to
the metered requests. Virtual time, constant sources; every figure by hand (W x s)."""

from __future__ import annotations

import pytest

from metering.accounting.report import Tokens
from metering.accounting.untracked import GRACE_S, SUSPECT_S, UntrackedWork, untracked_count
from metering.carbon.intensity import StaticIntensity
from metering.meter import Measurement, Meter, Plan
from metering.sources.constant import ConstantSource
from tests.support.clock import StepClock

MODES = ["model", "queue", "tokens", "equal"]
PAYLOAD = {"model": "m", "messages": [{"role": "user", "content": "hello " * 50}]}


def box(power_w: float, name: str = "box", domain: str = "system") -> ConstantSource:
    s = ConstantSource(power_w, 0.0)
    s.name = name
    s.domain = domain  # type: ignore[assignment]
    return s


def meter_of(clock: StepClock, mode: str = "equal", power_w: float = 700.0) -> Meter:
    return Meter.build(
        [box(power_w)],
        [Plan("b")],
        StaticIntensity(0.0),
        clock=clock,
        attribution=mode,
        idle_watts=0.0,
    )


def close(meter: Meter, m: Measurement, rid: str = "r", endpoint: str = "chat") -> object:
    return meter.close(
        m,
        answered=True,
        request_id=rid,
        model="m",
        category="other",
        tokens=Tokens(10, 5, "backend"),
        endpoint=endpoint,
    )


def stream(meter: Meter) -> Measurement:
    """A stream that decodes from the start (its first token at once)."""
    m = meter.open("b", PAYLOAD, stream=True)
    meter.first_token(m)
    return m


def balance_j(meter: Meter, told_j: float) -> float:
    """Measured minus (told to requests + untracked + idle): 0 when conserved."""
    ch = meter.sampler.ledger.channels["box"]
    return ch.measured_j - (told_j + meter.untracked_joules("b") + ch.idle_j)


# --- the pure count -------------------------------------------------------------------------


def test_the_count_is_what_runs_beyond_the_proxys_own() -> None:
    assert untracked_count(2.0, 1) == 1
    assert untracked_count(1.0, 3) == 0  # fewer than the proxy's own: nothing untracked
    assert untracked_count(None, 0) == 0
    assert untracked_count(float("nan"), 0) == 0
    assert untracked_count(2.6, 1) == 2  # a gauge averaged over an interval, rounded


def test_requests_closed_a_moment_ago_still_count_as_the_proxys() -> None:
    u = UntrackedWork()
    u.ended(10.0)  # counted by the backend when its gauge was read, ended since
    assert u.read(10.0 + GRACE_S / 2, 2.0, 1) == 0
    assert u.read(10.0 + 2 * GRACE_S, 2.0, 1) == 1
    assert not u.recent_ends_s  # nothing kept beyond the grace


def test_a_reading_with_nothing_of_the_proxys_in_flight_counts_none() -> None:
    # An idle engine's gauges hold their last step's figures (vLLM steps to update them):
    # read while the proxy has nothing in flight, they may be stale, and protect nobody.
    u = UntrackedWork()
    assert u.read(1.0, 3.0, 0) == 0
    assert u.read(2.0, 3.0, 1) == 2


# --- the split ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_request_beside_one_sent_around_the_proxy_gets_half(mode: str) -> None:
    clock = StepClock()
    meter = meter_of(clock, mode)
    clock.t_s = 1.0
    m = stream(meter)
    meter.learn("b", 2, 0)  # the backend runs two: one of them the proxy never saw
    assert meter.untracked_requests("b") == 1
    clock.t_s = 3.0
    r = close(meter, m)
    meter.sampler.read_all()
    assert r.energy_j == pytest.approx(700.0, rel=1e-9)  # half of 700 W x 2 s
    assert meter.untracked_joules("b") == pytest.approx(700.0, rel=1e-9)
    assert r.shared_with_untracked is True and r.to_dict()["shared_with_untracked"] is True
    assert balance_j(meter, r.energy_j) == pytest.approx(0.0, abs=1e-6)
    ch = meter.sampler.ledger.channels["box"]
    assert ch.attributed_j == pytest.approx(r.energy_j, rel=1e-9)
    assert ch.untracked_j == pytest.approx(700.0, rel=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_without_the_gauges_the_request_gets_all_of_it(mode: str) -> None:
    clock = StepClock()
    meter = meter_of(clock, mode)
    clock.t_s = 1.0
    m = stream(meter)
    clock.t_s = 3.0
    r = close(meter, m)
    assert r.energy_j == pytest.approx(1400.0, rel=1e-9)
    assert meter.untracked_joules("b") == 0.0
    assert r.shared_with_untracked is None  # nobody read the gauges: nobody can tell
    assert r.to_dict()["shared_with_untracked"] is None


@pytest.mark.parametrize("running", [0, 1])
def test_gauges_showing_no_more_than_the_proxys_own_change_nothing(running: int) -> None:
    clock = StepClock()
    meter = meter_of(clock, "model")
    clock.t_s = 1.0
    m = stream(meter)
    weight = m.flight.weight
    meter.learn("b", running, 0)
    assert meter.untracked_requests("b") == 0
    assert m.flight.weight == weight
    clock.t_s = 3.0
    r = close(meter, m)
    assert r.energy_j == pytest.approx(1400.0, rel=1e-9)
    assert meter.untracked_joules("b") == 0.0
    assert r.shared_with_untracked is False  # the gauges were read and showed none


def test_learning_partway_splits_from_then_on() -> None:
    clock = StepClock()
    meter = meter_of(clock, "equal")
    clock.t_s = 1.0
    m = stream(meter)
    clock.t_s = 1.5
    meter.learn("b", 3, 0)  # from 1.5 s, two more run beside it
    clock.t_s = 3.0
    r = close(meter, m)
    assert r.energy_j == pytest.approx(700.0 * (0.5 + 1.5 / 3), rel=1e-9)
    assert meter.untracked_joules("b") == pytest.approx(700.0 * 1.5 * 2 / 3, rel=1e-9)


def test_gauges_read_while_the_proxy_is_idle_leave_the_energy_idle() -> None:
    clock = StepClock()
    meter = meter_of(clock)
    clock.t_s = 1.0
    meter.learn("b", 1, 0)  # perhaps an idle engine's last figure: not taken
    assert meter.untracked_requests("b") == 0
    clock.t_s = 3.0
    meter.sampler.read_all()
    ch = meter.sampler.ledger.channels["box"]
    assert meter.untracked_joules("b") == 0.0
    assert ch.idle_j == pytest.approx(700.0 * 3.0)
    assert balance_j(meter, 0.0) == pytest.approx(0.0, abs=1e-6)


def test_a_reading_without_a_count_ends_the_account() -> None:
    clock = StepClock()
    meter = meter_of(clock)
    clock.t_s = 1.0
    m = stream(meter)
    meter.learn("b", 3, 0)
    assert meter.untracked_requests("b") == 2
    clock.t_s = 2.0
    meter.learn("b", None, None)  # the gauges could not be read
    assert meter.untracked_requests("b") == 0
    clock.t_s = 3.0
    # Equal shares: a third of 1 s at 700 W, then all of the next second.
    assert close(meter, m).energy_j == pytest.approx(700.0 / 3 + 700.0)
    assert meter.untracked_joules("b") == pytest.approx(700.0 * 2 / 3)


def test_the_account_decays_when_the_gauges_stop_coming() -> None:
    clock = StepClock()
    meter = meter_of(clock)
    clock.t_s = 0.5
    long_one = stream(meter)  # the proxy's own, in flight throughout
    for t_s in (1.0, 2.0):  # read every second
        clock.t_s = t_s
        meter.learn("b", 2, 0)
    clock.t_s = 4.5  # 2.5 periods without a reading: still believed
    meter.sampler.tick()
    assert meter.untracked_requests("b") == 1
    clock.t_s = 5.5  # 3.5 periods: what they said no longer holds
    meter.sampler.tick()
    assert meter.untracked_requests("b") == 0
    clock.t_s = 6.5
    r = close(meter, long_one)
    # Alone until 1 s and after 5.5 s; an equal half from 1 s to 5.5 s.
    assert r.energy_j == pytest.approx(700.0 * (0.5 + 1.0) + 700.0 * 4.5 / 2)
    assert r.shared_with_untracked is True
    assert meter.untracked_joules("b") == pytest.approx(700.0 * 4.5 / 2)


def test_a_request_that_opened_before_untracked_work_began_and_ended_after_it_shared() -> None:
    clock = StepClock()
    meter = meter_of(clock)
    meter.learn("b", 0, 0)
    clock.t_s = 1.0
    m = stream(meter)
    clock.t_s = 2.0
    meter.learn("b", 2, 0)
    clock.t_s = 3.0
    meter.learn("b", 1, 0)  # the untracked one ended: only the proxy's own runs
    clock.t_s = 4.0
    r = close(meter, m)
    assert r.shared_with_untracked is True
    assert r.energy_j == pytest.approx(700.0 * (1.0 + 0.5 + 1.0))
    other = stream(meter)
    clock.t_s = 5.0
    assert close(meter, other, "o").shared_with_untracked is False


def test_model_mode_weighs_the_untracked_as_decoding_requests() -> None:
    clock = StepClock()
    meter = meter_of(clock, "model")
    clock.t_s = 1.0
    prefilling = meter.open("b", PAYLOAD, stream=True)  # a long prompt in prefill: heavy
    decoding = stream(meter)
    meter.learn("b", 3, 0)
    ticket = meter.lane("b").untracked.ticket
    assert ticket is not None
    (share, *_) = ticket.shares
    assert share.weight == pytest.approx(decoding.flight.weight)
    assert share.eq == decoding.flight.eq == 1.0
    clock.t_s = 2.0
    rp, rd = close(meter, prefilling, "p"), close(meter, decoding, "d")
    assert rd.energy_j == pytest.approx(meter.untracked_joules("b"), rel=1e-9)
    assert rp.energy_j > rd.energy_j
    assert balance_j(meter, rp.energy_j + rd.energy_j) == pytest.approx(0.0, abs=1e-6)


def test_intervals_with_untracked_work_are_not_fitted() -> None:
    clock = StepClock()
    meter = meter_of(clock, "model")
    lane = meter.lane("b")
    for i in range(1, 5):
        clock.t_s = i * 0.5
        meter.sampler.tick()
    m = stream(meter)
    meter.learn("b", 2, 0)
    for i in range(5, 9):
        clock.t_s = i * 0.5
        meter.sampler.tick()
    meter.learn("b", 1, 0)
    for i in range(9, 13):
        clock.t_s = i * 0.5
        meter.sampler.tick()
    close(meter, m)
    clean = [iv.clean for iv in lane.fit._intervals]
    # Ticks at 2.5-4.0 s closed intervals with it running; the one closed at 4.5 s had it
    # in its first instant (the reading at 4.0 s), the later ones none.
    assert clean == [True] * 3 + [False] * 5 + [True] * 3


def test_untracked_joules_of_an_unknown_backend_is_zero() -> None:
    meter = meter_of(StepClock())
    assert meter.untracked_joules("nobody") == 0.0
    assert meter.untracked_requests("nobody") == 0


def test_the_endpoint_is_carried_into_the_report() -> None:
    clock = StepClock()
    meter = meter_of(clock)
    m = meter.open("b", {"model": "m", "query": "q", "documents": ["a", "b"]},
                   stream=False, embeddings=True)  # fmt: skip
    clock.t_s = 1.0
    r = close(meter, m, endpoint="rerank")
    assert r.endpoint == "rerank" and r.to_dict()["endpoint"] == "rerank"
    other = meter.open("b", PAYLOAD, stream=False)
    default = meter.close(
        other, answered=True, request_id="x", model="m", category="other", tokens=None
    )
    assert default.endpoint == "chat" and default.to_dict()["endpoint"] == "chat"


def test_work_seen_while_the_proxy_was_idle_has_the_gauges_read_at_the_next_open() -> None:
    clock = StepClock()
    meter = meter_of(clock)
    wanted: list[str] = []
    meter.on_gauges_wanted = wanted.append
    clock.t_s = 1.0
    meter.learn("b", 1, 0)  # idle: perhaps stale, so not counted, but kept in mind
    assert meter.untracked_requests("b") == 0 and meter.lane("b").untracked.unconfirmed == 1
    stream(meter)
    assert wanted == ["b"]  # read again at once: confirmed or not within a fast period
    meter.learn("b", 2, 0)  # confirmed: one runs beside the proxy's own
    assert meter.untracked_requests("b") == 1 and meter.lane("b").untracked.unconfirmed == 0


def test_a_quiet_idle_reading_asks_for_no_read() -> None:
    clock = StepClock()
    meter = meter_of(clock)
    wanted: list[str] = []
    meter.on_gauges_wanted = wanted.append
    meter.learn("b", 0, 0)
    stream(meter)
    assert wanted == []


def test_the_gauges_are_wanted_often_a_while_after_work_around_the_proxy_was_seen() -> None:
    clock = StepClock()
    meter = meter_of(clock)
    clock.t_s = 1.0
    meter.learn("b", 1, 0)  # seen while the proxy is idle
    assert not meter.gauges_wanted("b")  # nothing of the proxy's to protect
    m = stream(meter)
    assert meter.gauges_wanted("b")
    clock.t_s = 1.2
    meter.learn("b", 1, 0)  # the backend has not admitted the proxy's request yet
    assert meter.untracked_requests("b") == 0 and meter.gauges_wanted("b")
    clock.t_s = 1.0 + SUSPECT_S - 0.1
    assert meter.gauges_wanted("b")  # still within a while of the reading that showed it
    clock.t_s = 1.0 + SUSPECT_S + 0.1
    assert not meter.gauges_wanted("b")
    close(meter, m)
