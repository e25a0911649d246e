"""The energy/latency Pareto front, the recommendation and the identical-outputs check."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.cli.bench.pareto import (
    MeasuredSetting,
    NoRecommendation,
    Recommendation,
    advise,
    change_pct,
    dominates,
    meets_targets,
    outputs_identical,
    pareto_front,
    recommend,
)


def pt(label: str, energy: float, ttft: float, tpot: float) -> MeasuredSetting:
    return MeasuredSetting(label, energy, ttft, tpot, {"name": label})


def labels(points: list[MeasuredSetting] | tuple[MeasuredSetting, ...]) -> list[str]:
    return [p.label for p in points]


# --------------------------------------------------------------------------- dominance, front


def test_dominates_needs_no_worse_everywhere_and_better_somewhere() -> None:
    a = pt("a", 1.0, 1.0, 1.0)
    assert dominates(a, pt("b", 1.0, 1.0, 2.0))
    assert dominates(a, pt("c", 2.0, 2.0, 2.0))
    assert not dominates(a, pt("same", 1.0, 1.0, 1.0))
    assert not dominates(a, pt("cheaper", 0.5, 2.0, 2.0))  # a trade-off, not dominance
    assert not dominates(pt("d", 1.0, 1.0, 2.0), a)


def test_front_by_hand() -> None:
    points = [
        pt("pl300", 2.0, 0.10, 0.020),  # fastest, most energy
        pt("pl250", 1.6, 0.11, 0.022),
        pt("pl200", 1.3, 0.15, 0.030),
        pt("pl150", 1.2, 0.30, 0.060),  # cheapest
        pt("bad", 1.7, 0.16, 0.031),  # dominated by pl200 (and pl250 on latency only)
        pt("slow-tpot", 1.6, 0.11, 0.025),  # dominated by pl250 (equal, equal, worse)
        pt("tradeoff", 1.25, 0.40, 0.020),  # worse TTFT but best TPOT among cheap ones
    ]
    front = pareto_front(points)
    assert labels(front) == ["pl150", "tradeoff", "pl200", "pl250", "pl300"]  # cheapest first


def test_front_keeps_ties_in_input_order_and_handles_edges() -> None:
    a, b = pt("a", 1.0, 0.2, 0.02), pt("b", 1.0, 0.2, 0.02)
    c = pt("c", 1.0, 0.1, 0.03)
    assert labels(pareto_front([a, b, c])) == ["c", "a", "b"]  # same J/token: lower TTFT first
    assert labels(pareto_front([b, a])) == ["b", "a"]
    assert pareto_front([]) == []
    assert pareto_front([a]) == [a]
    assert pareto_front(iter([a, pt("worse", 2.0, 0.2, 0.02)])) == [a]  # any iterable


def test_measured_setting_validates_and_hashes_without_its_setting() -> None:
    with pytest.raises(ValueError, match="energy_j_per_token must be finite"):
        MeasuredSetting("x", math.nan, 0.1, 0.01)
    with pytest.raises(ValueError, match="p90_ttft_s must be finite and >= 0"):
        MeasuredSetting("x", 1.0, -0.1, 0.01)
    with pytest.raises(ValueError, match="mean_tpot_s must be a number"):
        MeasuredSetting("x", 1.0, 0.1, "fast")  # type: ignore[arg-type]
    point = MeasuredSetting("x", 1.0, 0.1, 0.01, {"power_limit_w": 250.0})
    assert point.objectives == (1.0, 0.1, 0.01)
    assert {point: 1}[point] == 1
    assert point.setting == {"power_limit_w": 250.0}


# --------------------------------------------------------------------------- recommendations


BASELINE = pt("now", 2.0, 0.10, 0.020)
SWEEP = [
    BASELINE,
    pt("pl250", 1.6, 0.11, 0.022),
    pt("pl200", 1.3, 0.15, 0.030),
    pt("pl150", 1.0, 0.30, 0.060),
]


def test_recommends_the_cheapest_point_without_targets() -> None:
    rec = recommend(SWEEP, BASELINE, None, None)
    assert isinstance(rec, Recommendation)
    assert rec.point.label == "pl150"
    assert rec.point.setting == {"name": "pl150"}
    assert rec.energy_saving_pct == pytest.approx(50.0)
    assert rec.ttft_change_pct == pytest.approx(200.0)
    assert rec.tpot_change_pct == pytest.approx(200.0)
    assert rec.latency_change_pct == pytest.approx(200.0)
    assert rec.message() == "50.0 % less energy than now, at 200.0 % more latency"
    assert labels(rec.front) == ["pl150", "pl200", "pl250", "now"]


def test_latency_targets_filter_the_front() -> None:
    rec = recommend(SWEEP, BASELINE, 0.2, 0.05)  # pl150 is too slow on both
    assert rec is not None and rec.point.label == "pl200"
    # 35 % less energy; TTFT +50 %, TPOT +50 %.
    assert rec.message() == "35.0 % less energy than now, at 50.0 % more latency"
    rec = recommend(SWEEP, BASELINE, None, 0.025)  # only the TPOT target binds
    assert rec is not None and rec.point.label == "pl250"
    assert [rec.ttft_change_pct, rec.tpot_change_pct] == pytest.approx([10.0, 10.0])
    rec = recommend(SWEEP, BASELINE, 0.15, None)  # a target met exactly is met
    assert rec is not None and rec.point.label == "pl200"
    assert meets_targets(SWEEP[2], 0.15, 0.03) and not meets_targets(SWEEP[2], 0.149, None)


def test_latency_change_is_the_worse_of_the_two() -> None:
    points = [pt("a", 1.5, 0.12, 0.019)]  # TTFT +20 %, TPOT -5 %
    rec = recommend(points, BASELINE, None, None)
    assert rec is not None
    assert rec.ttft_change_pct == pytest.approx(20.0)
    assert rec.tpot_change_pct == pytest.approx(-5.0)
    assert rec.latency_change_pct == pytest.approx(20.0)
    assert rec.message() == "25.0 % less energy than now, at 20.0 % more latency"


def test_message_when_latency_does_not_get_worse() -> None:
    same = recommend([pt("a", 1.0, 0.10, 0.020)], BASELINE, None, None)
    assert same is not None
    assert same.message() == "50.0 % less energy than now, at no more latency"
    faster = recommend([pt("b", 1.9, 0.09, 0.018)], BASELINE, None, None)
    assert faster is not None
    assert faster.latency_change_pct == pytest.approx(-10.0)
    assert faster.message() == "5.0 % less energy than now, at 10.0 % less latency"


def test_ties_in_energy_go_to_the_faster_point() -> None:
    points = [pt("slow", 1.0, 0.3, 0.03), pt("fast", 1.0, 0.2, 0.03), pt("twin", 1.0, 0.2, 0.03)]
    rec = recommend(points, BASELINE, None, None)
    assert rec is not None and rec.point.label == "fast"  # then input order
    assert labels(rec.front) == ["fast", "twin"]


def test_nothing_meets_the_targets() -> None:
    result = advise(SWEEP, BASELINE, 0.05, None)
    assert isinstance(result, NoRecommendation)
    assert result.message() == "no measured setting meets the latency targets (p90 TTFT <= 0.05 s)"
    assert labels(result.front) == ["pl150", "pl200", "pl250", "now"]
    assert recommend(SWEEP, BASELINE, 0.05, None) is None
    reason = advise(SWEEP, BASELINE, 0.05, 0.01)
    assert reason.message().endswith("(p90 TTFT <= 0.05 s and mean TPOT <= 0.01 s)")


def test_nothing_beats_the_baseline() -> None:
    # Only the baseline itself (and a dearer point) meet the targets.
    points = [*SWEEP, pt("dear", 2.5, 0.10, 0.020)]
    assert recommend(points, BASELINE, 0.105, None) is None
    result = advise(points, BASELINE, 0.105, None)
    assert isinstance(result, NoRecommendation)
    assert result.reason == (
        "no setting within the latency targets (p90 TTFT <= 0.105 s) uses less energy per "
        "token than now (now: 2 J/token; best: now: 2 J/token)"
    )
    # An equal J/token is no saving either, even at lower latency.
    assert recommend([pt("eq", 2.0, 0.05, 0.01)], BASELINE, None, None) is None


def test_baseline_need_not_be_among_the_points() -> None:
    rec = recommend(SWEEP[1:], BASELINE, None, None)
    assert rec is not None and rec.point.label == "pl150"
    assert labels(rec.front) == ["pl150", "pl200", "pl250"]


def test_no_points_and_bad_targets() -> None:
    result = advise([], BASELINE, None, None)
    assert isinstance(result, NoRecommendation) and result.reason == "no setting was measured"
    with pytest.raises(ValueError, match="slo_ttft_s"):
        advise(SWEEP, BASELINE, math.nan, None)
    with pytest.raises(ValueError, match="slo_tpot_s"):
        advise(SWEEP, BASELINE, None, -1.0)


def test_change_pct_with_a_zero_baseline() -> None:
    assert change_pct(0.0, 0.0) == 0.0
    assert change_pct(0.1, 0.0) == math.inf
    assert change_pct(1.5, 1.0) == pytest.approx(50.0)
    zero_tpot = pt("one-token", 2.0, 0.1, 0.0)
    rec = recommend([pt("a", 1.0, 0.1, 0.01)], zero_tpot, None, None)
    assert rec is not None
    assert rec.message() == "50.0 % less energy than now, at inf % more latency"


# --------------------------------------------------------------------------- properties


objective = st.integers(min_value=0, max_value=4).map(float)  # small range: many ties
points_strategy = st.lists(
    st.tuples(objective, objective, objective).map(lambda t: pt("p", *t)), max_size=25
)


@given(points_strategy)
def test_front_property(points: list[MeasuredSetting]) -> None:
    front = pareto_front(points)
    front_ids = {id(p) for p in front}
    assert len(front_ids) == len(front)
    for f in front:
        assert not any(dominates(p, f) for p in points)
    for p in points:
        if id(p) not in front_ids:
            assert any(dominates(f, p) for f in front)
    assert front == sorted(front, key=lambda p: p.objectives)


@given(
    points_strategy,
    st.tuples(objective, objective, objective),
    st.none() | objective,
    st.none() | objective,
)
def test_recommendation_property(
    points: list[MeasuredSetting],
    base: tuple[float, float, float],
    slo_ttft_s: float | None,
    slo_tpot_s: float | None,
) -> None:
    baseline = pt("now", *base)
    rec = recommend(points, baseline, slo_ttft_s, slo_tpot_s)
    inside = [p for p in points if meets_targets(p, slo_ttft_s, slo_tpot_s)]
    cheapest = min((p.energy_j_per_token for p in inside), default=math.inf)
    if rec is None:
        assert cheapest >= baseline.energy_j_per_token
        return
    assert meets_targets(rec.point, slo_ttft_s, slo_tpot_s)
    assert any(rec.point is f for f in pareto_front(points))
    assert rec.point.energy_j_per_token == cheapest < baseline.energy_j_per_token
    assert rec.energy_saving_pct > 0


# --------------------------------------------------------------------------- identical outputs


def test_outputs_identical_across_settings() -> None:
    outputs = {"now": ["4", "Paris", "def f(): pass"], "pl200": ["4", "Paris", "def f(): pass"]}
    assert outputs_identical(outputs) == (True, [])
    assert outputs_identical({"only": ["a"]}) == (True, [])
    assert outputs_identical({}) == (True, [])


def test_outputs_that_differ_are_named_by_prompt() -> None:
    outputs = {
        "now": ["4", "Paris", "x", "y"],
        "pl200": ["4", "Paris.", "x", "y"],
        "pl150": ["4", "Paris", "x", "z"],
    }
    assert outputs_identical(outputs) == (False, ["1", "3"])


def test_outputs_by_prompt_id_and_missing_answers() -> None:
    outputs = {
        "now": {"math-1": "4", "geo-1": "Paris", "code-1": "pass"},
        "pl200": {"code-1": "pass", "math-1": "4"},  # no answer for geo-1
    }
    assert outputs_identical(outputs) == (False, ["geo-1"])
    assert outputs_identical({"a": ["x", "y"], "b": ["x"]}) == (False, ["1"])
    # Exact comparison: whitespace counts.
    assert outputs_identical({"a": {"q": "4"}, "b": {"q": "4 "}}) == (False, ["q"])
    with pytest.raises(TypeError, match="not one string"):
        outputs_identical({"a": "xy"})
