"""Energy Score stars (AI Energy Score method) on hand-computed examples."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metering.ratings.score import (
    MIN_REQUESTS_FOR_RATING,
    rate,
    star_bands,
    wh_per_1000_queries,
)


def test_wh_per_1000_queries_by_hand() -> None:
    # 36 J per query x 1000 queries = 36,000 J = 36,000 / 3,600 Wh = 10 Wh.
    assert wh_per_1000_queries(36.0) == pytest.approx(10.0)
    assert wh_per_1000_queries(3.6) == pytest.approx(1.0)
    # 1 Wh per query is 3,600 J; 1,000 of them are 1,000 Wh.
    assert wh_per_1000_queries(3600.0) == pytest.approx(1000.0)
    assert wh_per_1000_queries(0.0) == 0.0


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_wh_per_1000_queries_refuses_impossible_energy(bad: float) -> None:
    with pytest.raises(ValueError):
        wh_per_1000_queries(bad)


def test_five_models_one_to_five_wh() -> None:
    # Range 1..5, band width 0.8: [1, 1.8] [1.8, 2.6] [2.6, 3.4] [3.4, 4.2] [4.2, 5].
    values = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": 5.0}
    assert star_bands(values) == {"a": 5, "b": 4, "c": 3, "d": 2, "e": 1}


def test_band_edges_go_to_the_better_band() -> None:
    # Range 0..5, band width 1: each integer is an edge, and takes the band below it.
    values = {f"m{i}": float(i) for i in range(6)}
    assert star_bands(values) == {"m0": 5, "m1": 5, "m2": 4, "m3": 3, "m4": 2, "m5": 1}


def test_just_above_an_edge_is_the_worse_band() -> None:
    assert star_bands({"lo": 0.0, "x": 1.001, "hi": 5.0})["x"] == 4
    assert star_bands({"lo": 0.0, "x": 0.999, "hi": 5.0})["x"] == 5


def test_decimal_edges_survive_float_rounding() -> None:
    # 0.1 .. 0.6: band width 0.1 in decimal, not quite in binary floating point.
    values = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4, "e": 0.5, "f": 0.6}
    assert star_bands(values) == {"a": 5, "b": 5, "c": 4, "d": 3, "e": 2, "f": 1}


def test_ties_get_equal_stars() -> None:
    assert star_bands({"a": 1.0, "b": 1.0, "c": 5.0}) == {"a": 5, "b": 5, "c": 1}
    assert star_bands({"a": 1.0, "b": 3.0, "c": 3.0, "d": 5.0}) == {
        "a": 5,
        "b": 3,
        "c": 3,
        "d": 1,
    }


def test_one_model_and_all_equal_get_five_stars() -> None:
    assert star_bands({"only": 12.5}) == {"only": 5}
    assert star_bands({"a": 2.0, "b": 2.0, "c": 2.0}) == {"a": 5, "b": 5, "c": 5}
    assert star_bands({"a": 0.0}) == {"a": 5}
    assert star_bands({}) == {}


@pytest.mark.parametrize("bad", [-0.5, math.nan, math.inf])
def test_star_bands_refuses_impossible_energy(bad: float) -> None:
    with pytest.raises(ValueError, match="'x'"):
        star_bands({"a": 1.0, "x": bad})


@given(st.dictionaries(st.text(max_size=3), st.floats(0, 1e6), min_size=1, max_size=12))
def test_stars_properties(values: dict[str, float]) -> None:
    stars = star_bands(values)
    assert set(stars) == set(values)
    assert all(1 <= s <= 5 for s in stars.values())
    by_value = sorted(values, key=values.__getitem__)
    # Less energy never gets fewer stars; the least gets 5, the most 1 if there is a range.
    assert all(stars[a] >= stars[b] for a, b in itertools.pairwise(by_value))
    assert stars[by_value[0]] == 5
    if values[by_value[-1]] > values[by_value[0]]:
        assert stars[by_value[-1]] == 1


def summary_row(model: str, category: str, count: int, mean_joules: float | None) -> dict[str, Any]:
    return {
        "model": model,
        "category": category,
        "count": count,
        "mean_joules": mean_joules,
        "mean_joules_per_token": None,
        "mean_co2eq_g": 0.1,
    }


def test_minimum_is_twenty() -> None:
    assert MIN_REQUESTS_FOR_RATING == 20


def test_rate_per_category_with_too_few_requests() -> None:
    rows = [
        summary_row("big", "code", 40, 360.0),  # 100 Wh / 1,000 queries
        summary_row("mid", "code", 20, 216.0),  # 60 Wh: (60-20)/(100-20) = 0.5 -> 3 stars
        summary_row("small", "code", 25, 72.0),  # 20 Wh
        summary_row("tiny", "code", 19, 3.6),  # 1 Wh, but 19 < 20: no rating, no effect
        summary_row("big", "sql", 30, 36.0),  # alone in sql: 5 stars
        summary_row("small", "sql", 2, 3.6),
    ]
    rated = rate(rows)
    assert [(r["model"], r["category"], r["stars"]) for r in rated] == [
        ("big", "code", 1),
        ("mid", "code", 3),
        ("small", "code", 5),
        ("tiny", "code", None),
        ("big", "sql", 5),
        ("small", "sql", None),
    ]
    assert [r["wh_per_1000_queries"] for r in rated] == pytest.approx(
        [100.0, 60.0, 20.0, 1.0, 10.0, 1.0]
    )
    assert rated[0]["mean_co2eq_g"] == 0.1  # other keys are kept
    assert "stars" not in rows[0]  # the input is not changed


def test_rate_min_count_and_missing_energy() -> None:
    rows = [summary_row("a", "math", 5, 36.0), summary_row("b", "math", 5, None)]
    assert [r["stars"] for r in rate(rows)] == [None, None]
    rated = rate(rows, min_count=5)
    assert [r["stars"] for r in rated] == [5, None]
    assert rated[1]["wh_per_1000_queries"] is None
    assert rate([]) == []
    with pytest.raises(ValueError, match="min_count"):
        rate(rows, min_count=0)


def test_rate_refuses_a_repeated_model_and_category() -> None:
    rows = [summary_row("a", "math", 30, 1.0), summary_row("a", "math", 30, 2.0)]
    with pytest.raises(ValueError, match="twice"):
        rate(rows)
