"""The time window of a summary: `?window=24h` or `?since=...`. Pure.

Rollups are hourly, so a window starts at the beginning of the hour its start falls in:
`?window=24h` at 14:20 counts the requests finished since 14:00 yesterday.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from metering.store.rollup import SECONDS_PER_HOUR

DEFAULT_WINDOW = "7d"
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
MAX_WINDOW_S = 100 * 365 * 86_400


class WindowError(ValueError):
    """A `window` or `since` a client sent that cannot be read; the message says why."""


@dataclass(frozen=True, slots=True)
class Window:
    """Requests finished from `since_s` (unix seconds, the start of an hour) on; None:
    everything stored. `name` is what was asked: "7d", "all", or "since"."""

    since_s: float | None
    name: str

    def to_dict(self) -> dict[str, str | None]:
        since = (
            None
            if self.since_s is None
            else datetime.fromtimestamp(self.since_s, UTC).isoformat().replace("+00:00", "Z")
        )
        return {"window": self.name, "since": since}


def parse_duration_s(text: str) -> float:
    """ "90m", "24h", "7d", "2w", "3600s" -> seconds."""
    m = _DURATION.fullmatch(text.strip().lower())
    if not m:
        raise WindowError(
            f"window {text!r} is not a duration: use a number and a unit (s, m, h, d, w), "
            "such as 24h or 7d, or 'all'"
        )
    seconds = float(m.group(1)) * _UNITS_S[m.group(2)]
    if not 0 < seconds <= MAX_WINDOW_S:
        raise WindowError(f"window {text!r} must be longer than 0 and at most 100 years")
    return seconds


def parse_since_s(text: str) -> float:
    """Unix seconds ("1764115200") or ISO 8601 ("2026-11-26T14:00:00Z"; no zone is UTC)."""
    t = text.strip()
    try:
        value = float(t)
    except ValueError:
        try:
            when = datetime.fromisoformat(t.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise WindowError(
                f"since {text!r} is neither unix seconds nor an ISO 8601 time "
                "(such as 2026-11-26T14:00:00Z)"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        try:
            # An offset can move a time at the edge of the calendar out of it (year 0).
            when = when.astimezone(UTC)
        except (ValueError, OverflowError):
            raise WindowError(f"since {text!r} is outside the calendar once in UTC") from None
        return max(0.0, when.timestamp())  # before 1970: every record is after it
    if not math.isfinite(value) or value < 0:
        raise WindowError(f"since {text!r} must be unix seconds, 0 or more")
    return value


def hour_start_s(t_s: float) -> float:
    return float(math.floor(t_s / SECONDS_PER_HOUR) * SECONDS_PER_HOUR)


def parse_window(
    window: str | None, since: str | None, now_s: float, default: str = DEFAULT_WINDOW
) -> Window:
    """The window a request asks for. `since` and `window` together are an error; neither
    is `default`. Raises `WindowError` with the reason."""
    if window is not None and since is not None:
        raise WindowError("give either window or since, not both")
    if since is not None:
        return Window(hour_start_s(min(parse_since_s(since), now_s)), "since")
    name = (window if window is not None else default).strip().lower()
    if name == "all":
        return Window(None, "all")
    return Window(hour_start_s(now_s - parse_duration_s(name)), name)
