"""The routing policies (backends/choice.py): each picks as it should, within the guard."""

from __future__ import annotations

from collections import Counter

import pytest

from backends.choice import (
    CROWDED,
    DOWN,
    EXPLORE,
    FEWEST,
    LOWEST,
    ONLY,
    ORDER,
    POLICIES,
    TIE,
    Candidate,
    Choice,
    allowed,
    choose,
)


def c(name: str, **kw: object) -> Candidate:
    return Candidate(name, **kw)  # type: ignore[arg-type]


def test_one_backend_is_the_only_choice_under_every_policy() -> None:
    for policy in POLICIES:
        assert choose(policy, [c("a", ready=False)]) == choose(policy, [c("a")])
        assert choose(policy, [c("a")]).reason == ONLY


def test_first_takes_the_first_ready_and_skips_one_that_is_down() -> None:
    cands = [c("a", ready=False), c("b"), c("c")]
    got = choose("first", cands)
    assert (got.index, got.reason) == (1, ORDER)


def test_none_ready_sends_to_the_first_to_answer_for_itself() -> None:
    got = choose("energy", [c("a", ready=False), c("b", ready=False)])
    assert (got.index, got.reason) == (0, DOWN)


def test_least_loaded_uses_the_backends_own_count_where_told() -> None:
    # The proxy sends fewer to a, but a's own gauges show others' work there.
    cands = [c("a", inflight=1, own_inflight=9), c("b", inflight=3)]
    got = choose("least-loaded", cands)
    assert (got.index, got.reason) == (1, FEWEST)


def test_energy_takes_the_lowest_estimate_clear_of_the_errors() -> None:
    cands = [c("a", per_token=1.5, per_token_se=0.1), c("b", per_token=1.0, per_token_se=0.1)]
    got = choose("energy", cands, draw=0.9)
    assert (got.index, got.reason) == (1, LOWEST)


def test_estimates_within_their_errors_tie_and_the_least_loaded_takes_it() -> None:
    cands = [
        c("a", per_token=1.0, per_token_se=0.2, inflight=5),
        c("b", per_token=1.1, per_token_se=0.2, inflight=2),
        c("c", per_token=3.0, per_token_se=0.2, inflight=0),
    ]
    got = choose("energy", cands, draw=0.9)
    assert (got.index, got.reason) == (1, TIE)


def test_exploration_sends_the_share_asked_for_spread_over_the_allowed() -> None:
    cands = [c("a", per_token=1.0, per_token_se=0.0), c("b", per_token=2.0, per_token_se=0.0)]
    draws = [i / 1000 for i in range(1000)]
    picks = [choose("carbon", cands, explore=0.05, draw=d) for d in draws]
    explored = [p for p in picks if p.reason == EXPLORE]
    assert len(explored) == 50
    assert {p.index for p in explored} == {1}  # always elsewhere than the policy's choice
    assert sum(1 for p in picks if p.index == 1) == 50
    three = [*cands, c("c", per_token=3.0, per_token_se=0.0)]
    spread = Counter(choose("energy", three, explore=0.05, draw=d).index for d in draws[:50])
    assert spread == Counter({1: 25, 2: 25})
    # first and least-loaded never explore
    assert all(choose("first", cands, draw=d).reason == ORDER for d in draws[:60])


def test_the_guard_skips_a_backend_whose_queue_is_past_its_bound() -> None:
    cands = [
        c("cheap", per_token=1.0, per_token_se=0.0, waiting=3.0),
        c("dear", per_token=2.0, per_token_se=0.0),
    ]
    assert allowed(cands, 0) == [1]
    assert choose("energy", cands, draw=0.9).index == 1
    assert choose("first", cands).index == 1
    # a bound of 4 lets this one be the fourth to wait there
    assert choose("energy", cands, draw=0.9, max_waiting=3).index == 1
    assert choose("energy", cands, draw=0.9, max_waiting=4).index == 0


def test_without_gauges_the_queue_is_the_proxys_own_beyond_the_learnt_capacity() -> None:
    full = c("cheap", per_token=1.0, per_token_se=0.0, inflight=9, capacity=8)
    cands = [full, c("dear", per_token=2.0, per_token_se=0.0, inflight=1, capacity=8)]
    assert full.queued() == 1.0 and not full.has_room()
    assert choose("energy", cands, draw=0.9).index == 1
    at_capacity = c("cheap", per_token=1.0, per_token_se=0.0, inflight=8, capacity=8)
    assert at_capacity.queued() == 0.0 and not at_capacity.has_room()
    # At capacity, nothing waiting yet: this one would wait, while the other has room.
    assert allowed([at_capacity, cands[1]], 0) == [1]
    assert allowed([at_capacity, cands[1]], 1) == [0, 1]


def test_all_queued_goes_to_the_least_loaded() -> None:
    cands = [
        c("a", per_token=1.0, per_token_se=0.0, waiting=4.0, own_inflight=12),
        c("b", per_token=2.0, per_token_se=0.0, waiting=1.0, own_inflight=9),
    ]
    got = choose("energy", cands, draw=0.9)
    assert (got.index, got.reason) == (1, CROWDED)


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="routing policy"):
        choose("cheapest", [c("a"), c("b")])


def test_an_estimate_that_is_not_a_number_is_no_estimate() -> None:
    nan, inf = float("nan"), float("inf")
    cands = [c("a", per_token=nan, per_token_se=0.0, inflight=2), c("b", per_token=1.0)]
    assert choose("energy", cands, draw=0.9) == Choice(1, TIE)  # a ties, b is less loaded
    every = [c("a", per_token=inf), c("b", per_token=inf, per_token_se=nan, inflight=1)]
    assert choose("carbon", every, draw=0.9) == Choice(0, TIE)


def test_a_backend_without_an_estimate_ties_rather_than_looks_dear() -> None:
    cands = [c("a", per_token=1.0, per_token_se=0.0, inflight=3), c("b", inflight=0)]
    got = choose("energy", cands, draw=0.9)
    assert (got.index, got.reason) == (1, TIE)
