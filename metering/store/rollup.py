"""Rollups: what summaries, ratings and labels are computed from. Pure.

A rollup row holds, for one period x model group x category x backend x tenant, the count
of successful requests (status 200) and the sums their means need. There are two levels,
hours and days (UTC); the store adds a batch's rows to both in the transaction that writes
the batch's records. A summary over a window reads the days the window holds whole and the
hours before the first of them (`Span.of`): at most a few rows per day and group, never the
records. So it costs the same at ten thousand records and at a hundred million, and the
records can be dropped (by age or for space) without changing it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from metering.store.records import RequestRecord

SECONDS_PER_HOUR = 3600
HOURS_PER_DAY = 24


class RollupKey(NamedTuple):
    period: int  # hours (or days) since the unix epoch: when the requests finished
    model: str  # the model group (RequestRecord.group)
    category: str
    backend: str
    tenant: str


@dataclass(slots=True)
class Sums:
    """Sums over a group's successful requests. `token_joules` sums the joules of the
    requests that have tokens to divide by (`RequestRecord.rated_tokens` > 0), `tokens`
    those tokens: their ratio is the group's joules per token."""

    count: int = 0
    joules: float = 0.0
    co2eq_g: float = 0.0
    token_joules: float = 0.0
    tokens: int = 0

    def add(self, other: Sums) -> None:
        self.count += other.count
        self.joules += other.joules
        self.co2eq_g += other.co2eq_g
        self.token_joules += other.token_joules
        self.tokens += other.tokens


def hour_of(finished_at_s: float) -> int:
    return int(finished_at_s // SECONDS_PER_HOUR)


def by_day(hourly: Mapping[RollupKey, Sums]) -> dict[RollupKey, Sums]:
    """Hourly rollup rows summed into daily ones (the key's period: days since the epoch)."""
    out: dict[RollupKey, Sums] = {}
    for key, s in hourly.items():
        day = key._replace(period=key.period // HOURS_PER_DAY)
        acc = out.get(day)
        if acc is None:
            acc = out[day] = Sums()
        acc.add(s)
    return out


@dataclass(frozen=True, slots=True)
class Span:
    """Which rollup rows a window from `since_hour` on reads: the days from `first_day`
    on, and the hours from `since_hour` up to (not including) that day's first hour."""

    first_day: int | None  # None: every day
    hours: tuple[int, int] | None  # [from, to) in hours; None: no hourly rows

    @classmethod
    def of(cls, since_hour: int | None) -> Span:
        if since_hour is None:
            return cls(None, None)
        first_day = -(-since_hour // HOURS_PER_DAY)  # the first day that starts in the window
        to = first_day * HOURS_PER_DAY
        return cls(first_day, (since_hour, to) if to > since_hour else None)


def counts(record: RequestRecord) -> bool:
    """Whether a record goes into the rollups: successful requests only."""
    return record.status == 200


def _finite(x: float | None) -> float:
    # A NaN or infinite figure must not poison a whole group's sums forever.
    return x if x is not None and x - x == 0.0 else 0.0


def rollup(records: Iterable[RequestRecord]) -> dict[RollupKey, Sums]:
    """The rollup rows of `records` (those that count)."""
    out: dict[RollupKey, Sums] = {}
    for r in records:
        if not counts(r):
            continue
        key = RollupKey(hour_of(r.finished_at), r.group, r.category, r.backend, r.tenant)
        s = out.get(key)
        if s is None:
            s = out[key] = Sums()
        joules = _finite(r.joules)
        s.count += 1
        s.joules += joules
        s.co2eq_g += _finite(r.co2eq_g)
        n = r.rated_tokens
        if n > 0:
            s.token_joules += joules
            s.tokens += n
    return out


def summary_rows(
    groups: Mapping[tuple[str, str], Sums], min_count: int = 1
) -> list[dict[str, Any]]:
    """Summary rows from sums per (model, category), sorted by both:
    `{"model", "category", "count", "mean_joules", "mean_joules_per_token",
    "mean_co2eq_g"}`; groups under `min_count` requests are left out.

    `mean_joules_per_token` is total joules / total tokens over the requests with tokens;
    None when none has any."""
    rows: list[dict[str, Any]] = []
    for (model, category), s in sorted(groups.items()):
        if s.count < max(1, min_count):
            continue
        rows.append(
            {
                "model": model,
                "category": category,
                "count": s.count,
                "mean_joules": s.joules / s.count,
                "mean_joules_per_token": s.token_joules / s.tokens if s.tokens else None,
                "mean_co2eq_g": s.co2eq_g / s.count,
            }
        )
    return rows


def by_model_category(
    rows: Iterable[tuple[RollupKey, Sums]],
) -> dict[tuple[str, str], Sums]:
    """Rollup rows summed over hours, backends and tenants."""
    out: dict[tuple[str, str], Sums] = {}
    for key, s in rows:
        acc = out.get((key.model, key.category))
        if acc is None:
            acc = out[(key.model, key.category)] = Sums()
        acc.add(s)
    return out


def tenant_hours(records: Iterable[RequestRecord]) -> dict[tuple[int, str], tuple[float, float]]:
    """Per (hour, tenant): the joules and grams CO2eq of every request, whatever its
    status (a client that hangs up mid-stream used energy too): what budgets count. NaN
    and infinite figures count as 0, as in the rollups."""
    out: dict[tuple[int, str], tuple[float, float]] = {}
    for r in records:
        key = (hour_of(r.finished_at), r.tenant)
        j, g = out.get(key, (0.0, 0.0))
        out[key] = (j + _finite(r.joules), g + _finite(r.co2eq_g))
    return out
