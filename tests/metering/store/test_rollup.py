"""Rollups and summary windows: pure math, no database."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metering.store.records import id_key, id_of
from metering.store.rollup import RollupKey, Sums, by_model_category, rollup, summary_rows
from metering.store.window import WindowError, parse_duration_s, parse_since_s, parse_window
from tests.support.storekit import make_record, rid

NOW = datetime(2026, 11, 26, 14, 20, 5, tzinfo=UTC).timestamp()


def test_rollup_keys_sums_and_what_counts() -> None:
    records = [
        make_record(rid(1), finished_at=7200.5, joules=3.0, completion_tokens=2, co2eq_g=0.5),
        make_record(rid(2), finished_at=10799.9, joules=5.0, completion_tokens=0, prompt_tokens=4),
        make_record(rid(3), finished_at=10800.0, joules=1.0),  # the next hour
        make_record(rid(4), finished_at=7300.0, joules=99.0, status=499),  # not counted
        make_record(rid(5), finished_at=7300.0, joules=float("nan"), completion_tokens=1),
        make_record(rid(6), finished_at=7300.0, model="x", model_group="other", tenant="t"),
    ]
    got = rollup(records)
    two = RollupKey(2, "m1", "code", "fake", "")
    assert got[two] == Sums(count=3, joules=8.0, co2eq_g=0.5 + 0.001 + 0.001, token_joules=8.0,
                            tokens=2 + 4 + 1)  # fmt: skip
    assert got[RollupKey(3, "m1", "code", "fake", "")].count == 1
    assert got[RollupKey(2, "other", "code", "fake", "t")].count == 1
    assert len(got) == 3


def test_summary_rows_from_sums() -> None:
    groups = {
        ("m", "code"): Sums(4, 40.0, 2.0, 30.0, 10),
        ("m", "chat"): Sums(1, 5.0, 0.1, 0.0, 0),
    }
    assert summary_rows(groups) == [
        {
            "model": "m",
            "category": "chat",
            "count": 1,
            "mean_joules": 5.0,
            "mean_joules_per_token": None,
            "mean_co2eq_g": 0.1,
        },
        {
            "model": "m",
            "category": "code",
            "count": 4,
            "mean_joules": 10.0,
            "mean_joules_per_token": 3.0,
            "mean_co2eq_g": 0.5,
        },
    ]
    assert [r["category"] for r in summary_rows(groups, min_count=2)] == ["code"]
    merged = by_model_category(
        [(RollupKey(1, "m", "code", "a", ""), Sums(1, 1.0, 0.0, 1.0, 1)),
         (RollupKey(2, "m", "code", "b", "t"), Sums(2, 2.0, 0.0, 2.0, 2))]
    )  # fmt: skip
    assert merged == {("m", "code"): Sums(3, 3.0, 0.0, 3.0, 3)}


@given(st.text(max_size=40))
def test_any_id_round_trips_through_its_key(text: str) -> None:
    if text.startswith("\x00"):
        return  # ids never start with NUL (HTTP cannot carry one)
    assert id_of(id_key(text)) == text


@given(st.binary(min_size=12, max_size=12))
def test_proxy_ids_are_stored_as_their_12_bytes(raw: bytes) -> None:
    proxy_id = "req-" + raw.hex()
    assert id_key(proxy_id) == raw
    assert id_of(raw) == proxy_id
    assert len(id_key("x" * 11)) != 12  # no other id can take a proxy id's key


@pytest.mark.parametrize(
    ("window", "since", "expected_since", "name"),
    [
        (None, None, datetime(2026, 11, 19, 14, tzinfo=UTC), "7d"),  # the default
        ("24h", None, datetime(2026, 11, 25, 14, tzinfo=UTC), "24h"),
        ("90m", None, datetime(2026, 11, 26, 12, tzinfo=UTC), "90m"),
        ("all", None, None, "all"),
        (None, "2026-11-26T09:30:00Z", datetime(2026, 11, 26, 9, tzinfo=UTC), "since"),
        (None, "2026-11-26T09:30:00", datetime(2026, 11, 26, 9, tzinfo=UTC), "since"),
        (None, "1795683600", datetime(2026, 11, 26, 9, tzinfo=UTC), "since"),
        (None, "2030-01-01T00:00:00Z", datetime(2026, 11, 26, 14, tzinfo=UTC), "since"),
    ],
)
def test_windows_start_at_the_hour(
    window: str | None, since: str | None, expected_since: datetime | None, name: str
) -> None:
    w = parse_window(window, since, NOW)
    assert w.name == name
    assert w.since_s == (None if expected_since is None else expected_since.timestamp())
    assert w.to_dict()["since"] == (
        None if expected_since is None else expected_since.isoformat().replace("+00:00", "Z")
    )


@pytest.mark.parametrize(
    ("window", "since", "message"),
    [
        ("7x", None, "not a duration"),
        ("-1h", None, "not a duration"),
        ("0h", None, "longer than 0"),
        ("6000w", None, "at most 100 years"),
        (None, "yesterday", "neither unix seconds nor an ISO 8601"),
        (None, "nan", "unix seconds"),
        (None, "-5", "unix seconds"),
        (None, "0001-01-01T00:00:00+00:01", "outside the calendar"),  # year 0 in UTC
        ("24h", "1795683600", "not both"),
    ],
)
def test_bad_windows_say_why(window: str | None, since: str | None, message: str) -> None:
    with pytest.raises(WindowError, match=message):
        parse_window(window, since, NOW)


def test_durations_and_times() -> None:
    assert parse_duration_s("2w") == 14 * 86_400
    assert parse_duration_s(" 1.5H ") == 5400
    assert (
        parse_since_s("2026-11-26T14:00:00+01:00")
        == datetime(2026, 11, 26, 13, tzinfo=UTC).timestamp()
    )
    assert math.isclose(parse_since_s("1764147600.5"), 1764147600.5)
