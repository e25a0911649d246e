"""The ledger's math: conservation, fairness, O(1) bookkeeping. No I/O."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metering.accounting.ledger import Ledger, Ticket


def test_two_overlapping_requests_split_equally() -> None:
    led = Ledger(["s"])
    led.record("s", 0.0, 0.0)
    a = led.start()
    led.record("s", 10.0, 1.0)  # 10 J with only a in flight
    b = led.start()
    led.record("s", 30.0, 2.0)  # 20 J shared by a and b
    (sa,) = led.finish(a)
    led.record("s", 35.0, 3.0)  # 5 J with only b
    (sb,) = led.finish(b)
    led.record("s", 45.0, 4.0)  # 10 J idle
    assert sa.energy_j == pytest.approx(20.0)
    assert sb.energy_j == pytest.approx(15.0)
    ch = led.channels["s"]
    assert ch.idle_j == pytest.approx(10.0)
    assert ch.measured_j == pytest.approx(45.0)
    assert ch.attributed_j == pytest.approx(35.0)


def test_dynamic_energy_subtracts_idle_draw() -> None:
    led = Ledger(["s"])
    led.record("s", 0.0, 0.0, idle_power_w=4.0)
    t = led.start()
    led.record("s", 10.0, 1.0, idle_power_w=4.0)  # 10 J in 1 s, 4 J of it idle draw
    (share,) = led.finish(t)
    assert share.energy_j == pytest.approx(10.0)
    assert share.dynamic_j == pytest.approx(6.0)


def test_weights_split_in_proportion() -> None:
    led = Ledger(["s"])
    led.record("s", 0.0, 0.0)
    a = led.start(weight=3.0)
    b = led.start(weight=1.0)
    led.record("s", 8.0, 1.0)
    led.reweigh(b, 3.0)
    led.record("s", 14.0, 2.0)
    (sa,) = led.finish(a)
    (sb,) = led.finish(b)
    assert sa.energy_j == pytest.approx(6.0 + 3.0)
    assert sb.energy_j == pytest.approx(2.0 + 3.0)


def test_counter_going_backwards_adds_nothing() -> None:
    led = Ledger(["s"])
    led.record("s", 100.0, 0.0)
    t = led.start()
    led.record("s", 5.0, 1.0)  # sensor reset
    led.record("s", 7.0, 2.0)
    (share,) = led.finish(t)
    assert share.energy_j == pytest.approx(2.0)


def test_finish_twice_is_harmless_and_bad_weights_refused() -> None:
    led = Ledger(["s"])
    led.record("s", 0.0, 0.0)
    t = led.start()
    led.record("s", 1.0, 1.0)
    first = led.finish(t)
    assert led.finish(t) == first
    assert led.inflight == 0
    with pytest.raises(ValueError):
        led.start(weight=-1.0)
    with pytest.raises(ValueError):
        Ledger([])


def test_a_request_of_weight_zero_is_owed_nothing_and_loses_nothing() -> None:
    """Weight 0: a request the queue model holds waiting. It is owed nothing while at 0;
    with only such requests in flight, the energy is idle (nobody's), never lost."""
    led = Ledger(["s"])
    led.record("s", 0.0, 0.0)
    waiting = led.start(weight=0.0)
    led.record("s", 5.0, 1.0)  # only a weight-0 request in flight: idle
    running = led.start(weight=2.0)
    led.record("s", 9.0, 2.0)  # 4 J, all to the running request
    led.reweigh(waiting, 1.0)  # admitted
    led.record("s", 12.0, 3.0)  # 3 J split 2:1
    (w,) = led.finish(waiting)
    (r,) = led.finish(running)
    ch = led.channels["s"]
    assert w.energy_j == pytest.approx(1.0)
    assert r.energy_j == pytest.approx(4.0 + 2.0)
    assert ch.idle_j == pytest.approx(5.0)
    assert w.energy_j + r.energy_j + ch.idle_j == pytest.approx(ch.measured_j)


# A schedule is a list of steps: ("read", joules drawn since the last reading),
# ("start", weight, untracked) or ("end", index among open requests) or ("reweigh", index,
# weight). An untracked ticket stands for work the proxy did not send (the meter's account).
step = st.one_of(
    st.tuples(st.just("read"), st.floats(min_value=0.0, max_value=1e4, allow_nan=False)),
    # 0: held waiting by the queue model; 41: 1 + 4000 prompt tokens / 100 in prefill.
    st.tuples(st.just("start"), st.sampled_from([0.0, 1.0, 2.0, 5.0, 41.0, 128.0]), st.booleans()),
    st.tuples(st.just("end"), st.integers(min_value=0, max_value=50)),
    st.tuples(
        st.just("reweigh"),
        st.integers(min_value=0, max_value=50),
        st.sampled_from([0.0, 1.0, 7.0, 6.0]),
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(step, max_size=120),
    st.integers(min_value=1, max_value=3),
    st.sampled_from([0.0, 0.5, 40.0]),
)
def test_conservation_attributed_plus_untracked_plus_idle_equals_measured(
    schedule: list[tuple[object, ...]], n_sources: int, fixed_w: float
) -> None:
    names = [f"s{i}" for i in range(n_sources)]
    led = Ledger(names)
    energy = dict.fromkeys(names, 0.0)
    t = 0.0
    for n in names:
        led.record(n, 0.0, t)
        led.channels[n].fixed_w = fixed_w  # `model` mode's fixed cost, shared by runners
    open_: list[Ticket] = []
    owed = dict.fromkeys(names, 0.0)
    owed_untracked = dict.fromkeys(names, 0.0)

    def settle(ticket: Ticket) -> None:
        into = owed_untracked if ticket.untracked else owed
        for share in led.finish(ticket):
            assert share.energy_j >= -1e-9
            into[share.name] += share.energy_j

    def read(drawn: float) -> None:
        nonlocal t
        t += 0.05
        for i, n in enumerate(names):
            energy[n] += drawn * (i + 1)
            led.record(n, energy[n], t)

    for s in schedule:
        kind = s[0]
        if kind == "read":
            read(float(s[1]))  # type: ignore[arg-type]
        elif kind == "start":
            read(0.5)  # the sampler reads at every boundary
            weight, untracked = float(s[1]), bool(s[2])  # type: ignore[arg-type]
            # A runner shares the fixed cost; the untracked account stands for two.
            eq = (2.0 if untracked else 1.0) if weight > 0.0 else 0.0
            open_.append(led.start(weight, eq=eq, untracked=untracked))
        elif kind == "end" and open_:
            read(0.5)
            settle(open_.pop(int(s[1]) % len(open_)))  # type: ignore[call-overload]
        elif kind == "reweigh" and open_:
            read(0.25)
            led.reweigh(open_[int(s[1]) % len(open_)], float(s[2]))  # type: ignore[call-overload]
    read(1.0)
    for ticket in open_:
        settle(ticket)
    for n in names:
        ch = led.channels[n]
        assert math.isclose(ch.measured_j, energy[n], rel_tol=1e-9, abs_tol=1e-9)
        total = owed[n] + owed_untracked[n] + ch.idle_j
        assert math.isclose(total, ch.measured_j, rel_tol=1e-9, abs_tol=1e-6)
        assert math.isclose(owed[n], ch.attributed_j, rel_tol=1e-9, abs_tol=1e-6)
        assert math.isclose(owed_untracked[n], ch.untracked_j, rel_tol=1e-9, abs_tol=1e-6)
        assert ch.attributed_j + ch.untracked_j + ch.idle_j == pytest.approx(ch.measured_j)


def test_an_open_tickets_owed_so_far_is_read_without_settling_it() -> None:
    led = Ledger(["s"])
    led.record("s", 0.0, 0.0)
    a = led.start(untracked=True)
    b = led.start()
    led.record("s", 10.0, 1.0)
    (so_far,) = led.owed(a)
    assert so_far.energy_j == pytest.approx(5.0)
    assert a.shares[0].owed_j == 0.0  # nothing settled by the read
    led.record("s", 20.0, 2.0)
    (sa,), (sb,) = led.finish(a), led.finish(b)
    assert sa.energy_j == sb.energy_j == pytest.approx(10.0)
    ch = led.channels["s"]
    assert ch.untracked_j == pytest.approx(10.0) and ch.attributed_j == pytest.approx(10.0)
    assert ch.untracked_weight == 0.0 and ch.members == 0


def test_the_untracked_account_never_trades_places_with_a_request() -> None:
    led = Ledger(["s"])
    led.record("s", 0.0, 0.0)
    a, u = led.start(), led.start(untracked=True)
    led.record("s", 10.0, 1.0)
    led.exchange(a, u)
    (sa,), (su,) = led.finish(a), led.finish(u)
    assert sa.energy_j == su.energy_j == pytest.approx(5.0)
    assert led.channels["s"].untracked_j == pytest.approx(su.energy_j)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=2, max_value=20),
    st.lists(st.floats(min_value=0.0, max_value=1e3), min_size=1, max_size=30),
)
def test_equal_work_gets_equal_energy(n: int, draws: list[float]) -> None:
    led = Ledger(["s"])
    e = 0.0
    led.record("s", e, 0.0)
    tickets = [led.start() for _ in range(n)]
    for i, d in enumerate(draws):
        e += d
        led.record("s", e, float(i + 1))
    shares = [led.finish(tk)[0].energy_j for tk in tickets]
    for s in shares:
        assert math.isclose(s, e / n, rel_tol=1e-9, abs_tol=1e-9)
