"""The attribution modes' weights and the queue model (metering/accounting/attribution.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metering.accounting.attribution import (
    DECODE,
    NEXT_STEP,
    PREFILL,
    PREFILL_TOKENS_PER_UNIT,
    WAITING,
    Attribution,
    EngineQueue,
    Flight,
)
from metering.accounting.ledger import Ledger


def test_tokens_and_equal_are_the_first_versions_modes() -> None:
    q = EngineQueue(configured=1)  # a limit the old modes ignore
    tokens = Attribution("tokens")
    a, b = Flight(400.0), Flight(400.0, stream=False)
    assert tokens.start(a, q) == 400.0  # prompt tokens while in prefill
    assert tokens.start(b, q) == 1.0  # non-streaming: 1 throughout
    assert tokens.first_token(a, q) == 1.0
    equal = Attribution("equal")
    c = Flight(400.0)
    assert equal.start(c, q) == 1.0 and equal.first_token(c, q) is None
    with pytest.raises(ValueError, match="queue, tokens, equal"):
        Attribution("shapley")


def test_queue_mode_weights_running_requests_by_phase() -> None:
    attr, q = Attribution("queue"), EngineQueue()
    rag, chat = Flight(4000.0), Flight(40.0)
    assert attr.start(rag, q) == 1.0 + 4000.0 / PREFILL_TOKENS_PER_UNIT
    assert attr.start(chat, q) == pytest.approx(1.4)
    assert attr.first_token(chat, q) == 1.0 and chat.phase == DECODE
    assert attr.first_token(chat, q) is None  # already decoding
    embed = Flight(300.0, stream=False, embeddings=True)
    assert attr.start(embed, q) == 4.0  # all prefill
    plain = Flight(300.0, stream=False)
    assert attr.start(plain, q) == 1.0  # no first token to see: 1 once running


def test_fifo_admission_under_the_capacity() -> None:
    attr, q = Attribution("queue"), EngineQueue(configured=2)
    a, b, c, d = (Flight(100.0) for _ in range(4))
    assert attr.start(a, q) == 2.0 and attr.start(b, q) == 2.0
    assert attr.start(c, q) == 0.0 and c.phase == WAITING  # full: it waits, weight 0
    assert attr.start(d, q) == 0.0
    # a ends: the oldest waiting (c) is admitted, in prefill; d still waits.
    assert attr.finish(a, q) == [(c, 2.0)]
    assert c.phase == PREFILL and d.phase == WAITING
    # A waiting request that ends (the client hung up) admits nobody and leaves the queue.
    assert attr.finish(d, q) == []
    assert not q.waiting and len(q.running) == 2


def test_a_request_served_out_of_order_takes_the_share_of_the_one_admitted_instead() -> None:
    """llama-cpp-python serves one request at a time, in no particular order. Three
    non-streaming requests (no first token ever shows): a runs, b and c wait; a ends, the
    model admits b, the backend runs c. c's answer arrives while the model holds it waiting:
    c ran in b's place, and b has not started."""
    attr, q, led = Attribution("queue"), EngineQueue(configured=1), Ledger(["gpu"])
    a, b, c = (Flight(1.0, stream=False) for _ in range(3))
    led.record("gpu", 0.0, 0.0)
    for f in (a, b, c):
        f.handle = led.start(attr.start(f, q))
    assert (b.phase, c.phase) == (WAITING, WAITING)
    led.record("gpu", 100.0, 1.0)  # a's second: 100 J
    a_j = sum(s.energy_j for s in led.finish(a.handle))
    for f, w in attr.finish(a, q):
        led.reweigh(f.handle, w)
    assert b.phase == PREFILL  # the model's guess, FIFO
    led.record("gpu", 160.0, 2.0)  # c's second, 60 J, charged to b by the model
    assert attr.ran_instead(c, q) is b
    led.exchange(c.handle, b.handle)
    c_j = sum(s.energy_j for s in led.finish(c.handle))
    assert attr.finish(c, q) == []  # b already holds the only place
    led.record("gpu", 230.0, 3.0)  # b's own second, 70 J
    b_j = sum(s.energy_j for s in led.finish(b.handle))
    assert (a_j, c_j, b_j) == pytest.approx((100.0, 60.0, 70.0))


def test_a_waiting_request_ending_beside_decoding_ones_takes_nobodys_share() -> None:
    attr, q = Attribution("queue"), EngineQueue(configured=1)
    a, b = Flight(10.0), Flight(10.0, stream=False)
    attr.start(a, q)
    attr.start(b, q)
    attr.first_token(a, q)  # a runs for certain: b ran beside it (the capacity was larger)
    assert attr.ran_instead(b, q) is None
    assert attr.ran_instead(a, q) is None  # not waiting: nothing to swap
    assert Attribution("equal").ran_instead(b, q) is None


def test_exchange_swaps_what_is_owed_in_shared_channels_only() -> None:
    led = Ledger(["gpu0", "gpu1", "cpu"])
    for name in led.channels:
        led.record(name, 0.0, 0.0)
    x = led.start(1.0, ["gpu0", "cpu"])
    y = led.start(1.0, ["gpu1", "cpu"])
    led.record("gpu0", 10.0, 1.0)
    led.record("gpu1", 30.0, 1.0)
    led.record("cpu", 8.0, 1.0)
    led.reweigh(y, 3.0)  # each owes 4 J of cpu so far; from now on y weighs 3 of 4
    led.record("cpu", 16.0, 2.0)
    led.exchange(x, y)
    led.exchange(x, x)  # with itself: nothing
    xs = {s.name: s.energy_j for s in led.finish(x)}
    ys = {s.name: s.energy_j for s in led.finish(y)}
    assert xs == pytest.approx({"gpu0": 10.0, "cpu": 4.0 + 6.0})  # y's cpu
    assert ys == pytest.approx({"gpu1": 30.0, "cpu": 4.0 + 2.0})  # x's cpu
    led.exchange(x, y)  # both finished: nothing moves
    assert {s.name: s.energy_j for s in led.finish(x)} == xs


def test_a_first_token_of_a_waiting_request_means_a_larger_capacity() -> None:
    attr, q = Attribution("queue"), EngineQueue()
    assert q.learn(running=1, waiting=3) and q.capacity == 1
    a, b = Flight(100.0), Flight(100.0)
    attr.start(a, q)
    attr.first_token(a, q)  # a decodes: it certainly runs
    assert attr.start(b, q) == 0.0
    assert attr.make_room(b, q) is None  # nobody it could have run in place of
    assert attr.first_token(b, q) == 1.0  # it runs after all
    assert q.capacity == 2 and b.phase == DECODE and not q.waiting


def test_a_first_token_of_a_waiting_request_displaces_the_newest_not_started() -> None:
    # Two arrivals raced: the engine took b before a. b's first token: a, admitted in the
    # model but not started, goes back to the front of the line; the capacity holds.
    attr, q = Attribution("model"), EngineQueue(configured=2)
    first, a, b, c = (Flight(100.0) for _ in range(4))
    for f in (first, a, b, c):
        attr.start(f, q)
    attr.first_token(first, q)
    assert b.phase == WAITING and a.phase == PREFILL
    assert attr.make_room(b, q) is a
    assert a.phase == WAITING and (a.weight, a.eq) == (0.0, 0.0)
    attr.first_token(b, q)
    assert list(q.waiting.values()) == [a, c]  # a first: it was ahead of c
    assert q.capacity == 2 and list(q.running.values()) == [first, b]


def test_metrics_set_the_capacity_and_the_newest_prefills_go_back_to_waiting() -> None:
    attr, q = Attribution("queue"), EngineQueue()
    flights = [Flight(100.0) for _ in range(5)]
    for f in flights:
        assert attr.start(f, q) == 2.0  # no capacity known: all run
    attr.first_token(flights[4], q)  # the newest already decodes: it certainly runs
    changed = attr.observe(q, running=3, waiting=2)
    assert q.capacity == 3
    # Beyond 3 running, the newest still in prefill (3, then 2) go back to waiting.
    assert changed == [(flights[3], 0.0), (flights[2], 0.0)]
    assert list(q.waiting.values()) == [flights[2], flights[3]]  # in arrival order
    assert attr.observe(q, running=3, waiting=2) == []  # the same figures: no change
    # A configured capacity is not overridden by metrics.
    fixed = EngineQueue(configured=4)
    assert not fixed.learn(running=2, waiting=5) and fixed.capacity == 4


def serve_fifo(attr: Attribution, q: EngineQueue, flights: list[Flight], limit: int) -> None:
    """A burst served as a FIFO engine with `limit` places would show it to the proxy:
    each request runs 1 s; the next one starts 0.05 s after an end frees a place."""
    for f in flights:
        f.t0_s = 0.0
        attr.start(f, q)
    t = 0.0
    for f in flights[:limit]:  # the first ones start on their own, at once
        if f.stream:  # a non-streaming request shows nothing until its end
            attr.infer(f, q, 0.05)
            attr.first_token(f, q)
    for i, f in enumerate(flights[limit:]):
        t = 1.0 + i * 0.01
        attr.finish(flights[i], q, t)
        if f.stream:
            attr.infer(f, q, t + 0.05)
            attr.first_token(f, q)


def test_without_gauges_the_capacity_shows_in_starts_that_follow_ends() -> None:
    attr, q = Attribution("model"), EngineQueue()
    flights = [Flight(100.0) for _ in range(8)]
    for f in flights:
        f.t0_s = 0.0
        assert attr.start(f, q) > 0.0  # no capacity known: all run
    for f in flights[:2]:
        assert attr.infer(f, q, 0.05) == []  # no request has ended: no evidence
        attr.first_token(f, q)
    # a ends at 1 s; c, in flight since 0 s, starts 0.05 s later: admitted in a's place.
    a, b, c, d = flights[:4]
    attr.finish(a, q, 1.0)
    assert attr.infer(c, q, 1.05) == [] and q.evidence == 1  # one start is not enough
    attr.first_token(c, q)
    attr.finish(b, q, 2.0)
    changed = attr.infer(d, q, 2.05)
    # Two such starts: the capacity is the most running at one (2: c and d); the newest
    # still in prefill go back to waiting, weightless, in arrival order.
    assert q.capacity == 2
    assert changed == [(flights[7], 0.0), (flights[6], 0.0), (flights[5], 0.0), (flights[4], 0.0)]
    assert list(q.waiting.values()) == flights[4:]
    assert all(f.weight == 0.0 and f.eq == 0.0 for f in flights[4:])
    attr.first_token(d, q)
    assert q.decoding == 2 and q.full()


def test_starts_on_their_own_show_no_capacity() -> None:
    # An engine that admits everything: first tokens come when each prefill is done, not
    # just after ends; one that comes long after an end is no admission either.
    attr, q = Attribution("model"), EngineQueue()
    a, b, c, d = (Flight(100.0, t0_s=t0) for t0 in (0.0, 0.0, 0.5, 1.2))
    for f in (a, b, c, d):
        attr.start(f, q)
    assert attr.infer(a, q, 0.1) == []  # no end yet
    attr.first_token(a, q)
    attr.finish(a, q, 0.7)
    assert attr.infer(b, q, 1.5) == []  # 0.8 s after the end, of 1.5 s in flight: its own
    attr.first_token(b, q)
    assert attr.infer(d, q, 1.3) == []  # sent after the end: that end freed it nothing
    attr.first_token(d, q)
    attr.finish(b, q, 1.6)
    assert attr.infer(c, q, 1.62) == [] and q.evidence == 1  # one such start: not yet
    assert q.capacity is None and q.decoding == 1


@pytest.mark.parametrize("limit", [1, 3, 12])
def test_a_fifo_engine_without_gauges_is_learnt_to_its_limit(limit: int) -> None:
    attr, q = Attribution("model"), EngineQueue()
    flights = [Flight(100.0) for _ in range(limit + 6)]
    serve_fifo(attr, q, flights, limit)
    assert q.capacity == limit


@pytest.mark.parametrize("quiet", [2, 4])
def test_requests_that_show_no_token_count_in_the_capacity_inferred(quiet: int) -> None:
    # A FIFO engine with 6 places, a burst of streams with `quiet` non-streaming requests
    # among the first six: they run but never show a token, so counting the decoding
    # requests saw 6 - quiet places and sent running requests back to waiting. Every
    # request that arrived before the one admitted runs (arrival order), shown or not.
    attr, q = Attribution("model"), EngineQueue()
    flights = [Flight(100.0, stream=i >= quiet) for i in range(8)]
    serve_fifo(attr, q, flights, 6)  # two ends, each followed by an admission: the limit
    assert q.capacity == 6
    assert len(q.running) == 6 and not q.waiting  # no running request sent back


def test_a_burst_at_one_instant_is_ordered_by_arrival_not_by_time() -> None:
    # All sent at the same clock reading (a burst on a coarse clock): the requests before
    # the one admitted are those that arrived before it, not every one sent at that time.
    attr, q = Attribution("model"), EngineQueue()
    flights = [Flight(100.0) for _ in range(10)]
    serve_fifo(attr, q, flights, 3)
    assert q.capacity == 3


def test_gauges_that_showed_the_capacity_or_a_configured_one_leave_nothing_to_infer() -> None:
    for q in (EngineQueue(configured=4), EngineQueue()):
        attr = Attribution("model")
        if q.configured is None:
            attr.observe(q, running=3.0, waiting=2.0)  # the gauges showed a queue
            assert q.gauged and q.capacity == 3
        flights = [Flight(100.0) for _ in range(8)]
        serve_fifo(attr, q, flights, 2)
        assert q.evidence == 0 and q.capacity == (4 if q.configured else 3)


def test_gauges_read_before_a_queue_showed_do_not_stop_inference() -> None:
    # A burst right after start: the gauges were read (nothing waiting then), and the
    # answers' starts still show the limit.
    attr, q = Attribution("model"), EngineQueue()
    attr.observe(q, running=1.0, waiting=0.0)
    assert not q.gauged and q.capacity is None
    serve_fifo(attr, q, [Flight(100.0) for _ in range(10)], 3)
    assert q.capacity == 3
    # A later read that shows a queue decides from then on, and may raise it.
    attr.observe(q, running=4.0, waiting=2.0)
    assert q.gauged and q.capacity == 4


def test_the_gauges_are_wanted_while_requests_may_queue() -> None:
    attr = Attribution("model")
    q = EngineQueue()
    attr.start(Flight(100.0), q)
    assert not q.may_queue()  # one request cannot wait
    attr.start(Flight(100.0), q)
    assert q.may_queue()  # no limit known: two may already queue
    limited = EngineQueue(configured=2)
    for _ in range(2):
        attr.start(Flight(100.0), limited)
    assert not limited.may_queue()
    attr.start(Flight(100.0), limited)
    assert limited.may_queue()


def test_observe_in_the_old_modes_changes_no_weight() -> None:
    attr, q = Attribution("tokens"), EngineQueue()
    f = Flight(100.0)
    attr.start(f, q)
    assert attr.observe(q, running=1, waiting=3) == []  # learnt, but tokens has no queue
    assert q.capacity == 1 and f.phase == PREFILL


EVENT = st.one_of(
    st.tuples(st.just("arrive"), st.sampled_from([40.0, 500.0, 4000.0]), st.booleans()),
    st.tuples(st.just("first"), st.integers(0, 40)),
    st.tuples(st.just("end"), st.integers(0, 40)),
    st.tuples(st.just("answered"), st.integers(0, 40)),
    st.tuples(st.just("read"), st.floats(0.0, 100.0)),
    st.tuples(st.just("metrics"), st.integers(0, 6), st.integers(0, 4)),
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(EVENT, max_size=150),
    st.sampled_from(["model", "queue", "tokens", "equal"]),
    st.floats(0.0, 50.0),
)
def test_any_schedule_conserves_energy_and_keeps_the_queue_consistent(
    events: list[tuple[object, ...]], mode: str, fixed_w: float
) -> None:
    """Whatever the order of arrivals, first tokens, ends and metrics: weights are never
    negative, the queue never holds a request while there is room, every joule is owed
    to a request or idle, and every request in flight is either running or waiting. In
    `model` mode the channel also has a fixed cost shared by the running requests."""
    attr, q, led = Attribution(mode), EngineQueue(), Ledger(["gpu"])
    if mode == "model":
        led.channels["gpu"].fixed_w = fixed_w
    flights: list[Flight] = []
    energy = t = 0.0
    owed = 0.0
    led.record("gpu", 0.0, 0.0)

    def apply(changes: list[tuple[Flight, float]]) -> None:
        for f, w in changes:
            assert w >= 0.0
            led.reweigh(f.handle, w, f.eq)

    for ev in events:
        if ev[0] == "arrive":
            f = Flight(float(ev[1]), stream=bool(ev[2]), t0_s=t)  # type: ignore[arg-type]
            w = attr.start(f, q)
            assert w >= 0.0
            assert f.eq == (1.0 if mode == "model" and f.phase != "waiting" else 0.0)
            f.handle = led.start(w, eq=f.eq)
            flights.append(f)
        elif ev[0] == "first" and flights:
            f = flights[int(ev[1]) % len(flights)]  # type: ignore[call-overload]
            apply(attr.infer(f, q, t))
            displaced = attr.make_room(f, q)
            if displaced is not None:
                assert displaced.phase == WAITING and id(displaced) in q.waiting
                led.exchange(f.handle, displaced.handle)
                apply([(displaced, 0.0)])
            w2 = attr.first_token(f, q)
            if w2 is not None:
                led.reweigh(f.handle, w2, f.eq)
        elif ev[0] in ("end", "answered") and flights:
            f = flights.pop(int(ev[1]) % len(flights))  # type: ignore[call-overload]
            instead = attr.ran_instead(f, q) if ev[0] == "answered" else None
            if instead is not None:
                assert instead.phase == PREFILL and id(instead) in q.running
                led.exchange(f.handle, instead.handle)
            owed += sum(s.energy_j for s in led.finish(f.handle))
            apply(attr.finish(f, q, t))
        elif ev[0] == "read":
            energy += float(ev[1])  # type: ignore[arg-type]
            t += 0.01
            led.record("gpu", energy, t)
        elif ev[0] == "metrics":
            apply(attr.observe(q, float(ev[1]), float(ev[2])))  # type: ignore[arg-type]
        in_flight = {id(f) for f in flights}
        assert set(q.running) | set(q.waiting) == in_flight
        assert not set(q.running) & set(q.waiting)
        assert q.decoding == sum(1 for g in q.running.values() if g.phase == DECODE)
        if q.waiting:
            assert q.full()
    for f in flights:
        owed += sum(s.energy_j for s in led.finish(f.handle))
    ch = led.channels["gpu"]
    assert owed + ch.idle_j == pytest.approx(ch.measured_j, rel=1e-9, abs=1e-6)
    assert ch.members == 0 and ch.runners == 0.0


def test_a_request_arriving_during_a_prefill_s_step_joins_the_next_one() -> None:
    """`model` mode: the engine is in a long prefill's step; a request that arrives more
    than a step after that prefill began is not in it (weight 0, NEXT_STEP) until the step
    ends (a first token, or an embeddings answer); one that arrives with it shares it."""
    attr, q = Attribution("model"), EngineQueue()
    step_s = q.price.step_s
    rag = Flight(4000.0)
    assert attr.start(rag, q, 0.0) == pytest.approx(q.price.prefill_j_per_token * 4000.0)
    together = Flight(500.0)
    assert attr.start(together, q, 0.5 * step_s) > 0.0 and together.phase == PREFILL
    late, later = Flight(40.0), Flight(300.0, stream=False, embeddings=True)
    assert attr.start(late, q, 5.0 * step_s) == 0.0 and late.phase == NEXT_STEP
    assert attr.start(later, q, 6.0 * step_s) == 0.0 and later.phase == NEXT_STEP
    assert attr.step_ended(EngineQueue(), 1.0) == []  # nothing waits for a step there
    # The long prefill's first token ends the step: both join the next, in prefill.
    attr.first_token(rag, q)
    joined = attr.step_ended(q, 0.04)
    assert [f for f, _ in joined] == [late, later]
    assert late.phase == PREFILL and late.prefill_from_s == 0.04
    assert dict((id(f), w) for f, w in joined)[id(later)] == pytest.approx(
        q.price.prefill_j_per_token * 300.0
    )
    # Without a clock (or in another mode) nobody is held.
    assert attr.start(Flight(10.0), q) > 0.0
    queue_mode, q2 = Attribution("queue"), EngineQueue()
    queue_mode.start(Flight(4000.0), q2, 0.0)
    assert queue_mode.start(Flight(40.0), q2, 1.0) > 0.0


def test_a_request_held_for_the_next_step_that_streams_first_decodes() -> None:
    attr, q = Attribution("model"), EngineQueue(configured=4)
    rag, chat = Flight(4000.0), Flight(40.0)
    attr.start(rag, q, 0.0)
    attr.start(chat, q, 1.0)
    assert chat.phase == NEXT_STEP
    assert attr.first_token(chat, q) == q.price.decode_j_per_step and chat.phase == DECODE
    assert not q.next_step
    # A held request that ends leaves no trace in the model.
    other = Flight(40.0)
    attr.start(other, q, 1.5)
    assert other.phase == NEXT_STEP
    attr.finish(other, q, 2.0)
    assert not q.next_step and id(other) not in q.running


def test_a_non_streamed_answer_pays_its_prompt_over_its_expected_steps() -> None:
    attr, q = Attribution("model"), EngineQueue()
    plain = Flight(1000.0, stream=False)
    price = q.price
    assert attr.start(plain, q, 0.0) == pytest.approx(
        price.decode_j_per_step + price.prefill_j_per_token * 1000.0 / price.amortize_steps
    )
