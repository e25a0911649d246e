"""Grid carbon intensity from the Electricity Maps v3 API, refreshed in the background.

`ElectricityMapsIntensity.run()` fetches `GET {base}/v3/carbon-intensity/latest` once at
start and then once per `refresh_s` (the API updates hourly); `current()` only reads what
the last fetch left behind, so the request path never waits on the network.

What `current()` reports:

- `electricitymaps`: the last fetch succeeded and is at most `2 * refresh_s` old;
- `cached`: a refresh has failed since (or the value went stale): the last good figure,
  with `age_s` telling how old it is;
- `fallback`: no fetch has succeeded yet: the configured static figure.

Failures back off exponentially (`next_fetch_delay_s`), honour `Retry-After`, and an
authentication error (401/403) is logged once and then retried at the longest backoff.
The API key goes out in the `auth-token` header and nowhere else: it is never logged,
never part of an exception message, `last_error` or `repr` (every message this module
writes is also scrubbed of it, in case an upstream library or the server echoes it).

No HTTP here: the provider is given a `LatestFetch`, the one call it needs (the proxy's
is proxy/carbon_client.py, over httpx; tests may pass another).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from metering.carbon.intensity import Intensity

log = logging.getLogger("energy_proxy.carbon")

SOURCE_LIVE = "electricitymaps"
SOURCE_CACHED = "cached"
SOURCE_FALLBACK = "fallback"

# The API's update period for `latest` (hourly data).
DEFAULT_REFRESH_S = 3600.0
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_BASE_BACKOFF_S = 5.0
# A Retry-After beyond a day is treated as a day: a bad header must not silence us for good.
MAX_RETRY_AFTER_S = 86400.0
# The `latest` answer is a few hundred bytes; anything far larger is not it.
MAX_BODY_BYTES = 64 * 1024
LATEST_PATH = "/v3/carbon-intensity/latest"
_REDACTED = "<redacted>"
_MAX_DETAIL_CHARS = 200


class ElectricityMapsError(Exception):
    """One failed fetch. The message never holds the API key.

    `status` is the HTTP status (None for transport errors and bad bodies),
    `retry_after_s` the server's Retry-After in seconds when it sent a usable one.
    """

    def __init__(
        self, message: str, *, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s

    @property
    def is_auth(self) -> bool:
        """401/403: a bad or unauthorised key, which will not fix itself."""
        return self.status in (401, 403)


@dataclass(frozen=True, slots=True)
class Answer:
    """What the API answered: status, body, and the headers the provider reads."""

    status: int
    body: bytes
    retry_after: str | None = None
    date: str | None = None


class LatestFetch(Protocol):
    """One GET of the API. Raises ElectricityMapsError when no answer came (a timeout over
    the whole exchange, a transport error, a body over `max_bytes`), with no key in it."""

    async def get(
        self,
        url: str,
        params: Mapping[str, str],
        headers: Mapping[str, str],
        timeout_s: float,
        max_bytes: int,
    ) -> Answer: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class LatestIntensity:
    """The parts of a `/v3/carbon-intensity/latest` answer that we use."""

    g_per_kwh: float  # carbonIntensity, gCO2eq/kWh
    zone: str  # "" when the answer named none
    datetime: str = ""  # the hour the figure is for (ISO 8601, UTC), as the API sent it
    is_estimated: bool | None = None


# --------------------------------------------------------------------------- pure parts


def parse_latest(body: bytes) -> LatestIntensity:
    """Parse a `latest` answer; ElectricityMapsError if it is not one with a usable figure.

    `carbonIntensity` must be a finite number >= 0 (booleans and strings are refused).
    """
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ElectricityMapsError("malformed JSON in the answer") from None
    if not isinstance(data, dict):
        raise ElectricityMapsError("malformed answer: not a JSON object")
    g = data.get("carbonIntensity")
    if g is None:
        raise ElectricityMapsError("malformed answer: no carbonIntensity")
    if isinstance(g, bool) or not isinstance(g, int | float):
        raise ElectricityMapsError("malformed answer: carbonIntensity is not a number")
    g_per_kwh = float(g)
    if not math.isfinite(g_per_kwh) or g_per_kwh < 0.0:
        raise ElectricityMapsError(
            f"malformed answer: carbonIntensity {g_per_kwh!r} is not a finite number >= 0"
        )
    zone = data.get("zone")
    when = data.get("datetime")
    estimated = data.get("isEstimated")
    return LatestIntensity(
        g_per_kwh=g_per_kwh,
        zone=zone if isinstance(zone, str) else "",
        datetime=when if isinstance(when, str) else "",
        is_estimated=estimated if isinstance(estimated, bool) else None,
    )


def parse_retry_after_s(value: str | None, date: str | None = None) -> float | None:
    """Seconds to wait from a Retry-After header, or None when absent or unusable.

    Delta-seconds are taken as they are; an HTTP-date is measured against the response's
    own `Date` header (so no local wall clock is needed) and is None without one.
    The result is clamped to [0, MAX_RETRY_AFTER_S].
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    if date is None:
        return None
    try:
        until = email.utils.parsedate_to_datetime(value)
        now = email.utils.parsedate_to_datetime(date)
        delta_s = (until - now).total_seconds()
    except (TypeError, ValueError):
        return None
    return min(max(delta_s, 0.0), MAX_RETRY_AFTER_S)


def next_fetch_delay_s(
    failures: int,
    *,
    refresh_s: float,
    base_backoff_s: float = DEFAULT_BASE_BACKOFF_S,
    max_backoff_s: float | None = None,
    retry_after_s: float | None = None,
    auth_failed: bool = False,
) -> float:
    """Seconds until the next fetch after `failures` consecutive failures (0: after a success).

    A success waits `refresh_s`. A failure waits min(max_backoff_s, base_backoff_s *
    2**(failures-1)) (max_backoff_s defaults to refresh_s); an authentication failure waits
    max_backoff_s at once; a Retry-After is honoured as a lower bound (never retry sooner
    than the server asked).
    """
    if failures <= 0:
        return refresh_s
    cap_s = refresh_s if max_backoff_s is None else max_backoff_s
    # The exponent is capped so that a long outage cannot overflow the float.
    backoff_s = min(cap_s, base_backoff_s * 2.0 ** min(failures - 1, 64))
    delay_s = cap_s if auth_failed else backoff_s
    if retry_after_s is not None:
        delay_s = max(delay_s, retry_after_s)
    return delay_s


# --------------------------------------------------------------------------- the provider


class _Secret:
    """Holds the key so that no repr, traceback local or debugger view prints it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return _REDACTED


class ElectricityMapsIntensity:
    """An IntensityProvider fed by Electricity Maps; `run()` keeps it fresh, `current()`
    never does I/O.

    Times are in seconds of `clock` (monotonic by default); `last_success_s` is a reading
    of that clock, not a wall-clock timestamp.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        zone: str | None = None,
        lat: float | None = None,
        lon: float | None = None,
        static_g_per_kwh: float,
        refresh_s: float = DEFAULT_REFRESH_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        fetch: LatestFetch,
        clock: Callable[[], float] = time.monotonic,
        base_backoff_s: float = DEFAULT_BASE_BACKOFF_S,
        max_backoff_s: float | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if zone is not None and (lat is not None or lon is not None):
            raise ValueError("give either an Electricity Maps zone or lat and lon, not both")
        if zone is None and (lat is None or lon is None):
            raise ValueError("give an Electricity Maps zone, or both lat and lon")
        params: dict[str, str]
        if zone is not None:
            if not zone.strip():
                raise ValueError("the Electricity Maps zone must not be empty")
            params = {"zone": zone.strip()}
        else:
            assert lat is not None and lon is not None
            if not (math.isfinite(lat) and -90.0 <= lat <= 90.0):
                raise ValueError("lat must be a latitude in degrees, -90 to 90")
            if not (math.isfinite(lon) and -180.0 <= lon <= 180.0):
                raise ValueError("lon must be a longitude in degrees, -180 to 180")
            params = {"lat": repr(float(lat)), "lon": repr(float(lon))}
        if not api_key:
            raise ValueError("no Electricity Maps API key (set ELECTRICITYMAPS_API_KEY)")
        if not all(33 <= ord(c) <= 126 for c in api_key):
            # An HTTP library would echo an illegal header value in its error message.
            raise ValueError(
                "the Electricity Maps API key has characters not allowed in an HTTP header"
            )
        if not (math.isfinite(static_g_per_kwh) and static_g_per_kwh >= 0.0):
            raise ValueError("static_g_per_kwh must be a finite number of gCO2eq/kWh >= 0")
        for name, value in (
            ("refresh_s", refresh_s),
            ("timeout_s", timeout_s),
            ("base_backoff_s", base_backoff_s),
            ("max_backoff_s", refresh_s if max_backoff_s is None else max_backoff_s),
        ):
            if not (math.isfinite(value) and value > 0.0):
                raise ValueError(f"{name} must be a finite number of seconds > 0")
        self.base_url = base_url.rstrip("/")
        self.zone = zone.strip() if zone is not None else ""
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = refresh_s if max_backoff_s is None else max_backoff_s
        self._key = _Secret(api_key)
        self._params = params
        self._static = Intensity(static_g_per_kwh, SOURCE_FALLBACK, self.zone)
        self._fetch_latest = fetch
        self._clock = clock
        self._sleep = sleep
        self._last: LatestIntensity | None = None
        self._last_zone = self.zone
        self._last_success_s: float | None = None
        self._failures = 0
        self._last_error = ""
        self._next_delay_s = 0.0
        self._auth_logged = False

    def __repr__(self) -> str:
        p = self._params
        where = f"zone={self.zone!r}" if self.zone else f"lat={p['lat']}, lon={p['lon']}"
        return f"ElectricityMapsIntensity({self.base_url!r}, {where}, failures={self._failures})"

    # ----------------------------------------------------------------- the request path

    def current(self) -> Intensity:
        """The intensity to use now; reads memory only."""
        last, fetched_s = self._last, self._last_success_s
        if last is None or fetched_s is None:
            return self._static
        age_s = max(0.0, self._clock() - fetched_s)
        fresh = self._failures == 0 and age_s <= 2.0 * self.refresh_s
        source = SOURCE_LIVE if fresh else SOURCE_CACHED
        return Intensity(last.g_per_kwh, source, self._last_zone, age_s=age_s)

    # ----------------------------------------------------------------- status

    @property
    def last_error(self) -> str:
        """The last failure's description ("" until one happens; kept after recovery)."""
        return self._last_error

    @property
    def last_success_s(self) -> float | None:
        """`clock()` at the last successful fetch, None before the first."""
        return self._last_success_s

    @property
    def failures(self) -> int:
        """Consecutive failed fetches since the last success (0 when healthy)."""
        return self._failures

    @property
    def next_delay_s(self) -> float:
        """The wait `run()` takes before the next fetch, as decided by the last one."""
        return self._next_delay_s

    @property
    def latest(self) -> LatestIntensity | None:
        """The last good answer, None before the first."""
        return self._last

    # ----------------------------------------------------------------- the background

    async def run(self) -> None:
        """Fetch now, then again after `next_delay_s` each time, until cancelled.

        Start it as a task beside the server and cancel it at shutdown; it closes the HTTP
        fetcher (which closes an HTTP client only if it made it).
        """
        try:
            while True:
                await self.refresh_once()
                await self._sleep(self._next_delay_s)
        finally:
            await self.aclose()

    async def refresh_once(self) -> bool:
        """One fetch; True when it brought a good figure. Never raises for a failed fetch."""
        try:
            latest = await self._fetch()
        except ElectricityMapsError as exc:
            self._record_failure(exc)
            return False
        except Exception as exc:  # a bug or an unforeseen library error must not end run()
            self._record_failure(ElectricityMapsError(f"unexpected {type(exc).__name__}: {exc}"))
            return False
        self._record_success(latest)
        return True

    async def aclose(self) -> None:
        """Close the fetcher (and its HTTP client, if the fetcher made it)."""
        await self._fetch_latest.aclose()

    # ----------------------------------------------------------------- internals

    async def _fetch(self) -> LatestIntensity:
        url = self.base_url + LATEST_PATH
        headers = {"auth-token": self._key.reveal(), "accept": "application/json"}
        answer = await self._fetch_latest.get(
            url, self._params, headers, self.timeout_s, MAX_BODY_BYTES
        )
        if answer.status != 200:
            retry_after_s = None
            if answer.status in (429, 503):
                retry_after_s = parse_retry_after_s(answer.retry_after, answer.date)
            raise ElectricityMapsError(
                _status_message(answer.status, answer.body),
                status=answer.status,
                retry_after_s=retry_after_s,
            )
        return parse_latest(answer.body)

    def _record_success(self, latest: LatestIntensity) -> None:
        if self._failures:
            log.warning("Electricity Maps recovered after %d failed fetch(es)", self._failures)
        elif self._last is None:
            log.info(
                "Electricity Maps: %s gCO2eq/kWh for zone %s (data for %s)",
                latest.g_per_kwh,
                latest.zone or self.zone or "?",
                latest.datetime or "?",
            )
        else:
            log.debug(
                "Electricity Maps: %s gCO2eq/kWh for zone %s (data for %s)",
                latest.g_per_kwh,
                latest.zone or self.zone,
                latest.datetime or "?",
            )
        self._last = latest
        # A configured zone stays the label (a bounded set); with lat/lon, the API's answer.
        self._last_zone = self.zone or latest.zone
        self._last_success_s = self._clock()
        self._failures = 0
        self._auth_logged = False
        self._next_delay_s = next_fetch_delay_s(0, refresh_s=self.refresh_s)

    def _record_failure(self, exc: ElectricityMapsError) -> None:
        message = self._redact(str(exc))
        first = self._failures == 0
        self._failures += 1
        changed = message != self._last_error
        self._last_error = message
        self._next_delay_s = next_fetch_delay_s(
            self._failures,
            refresh_s=self.refresh_s,
            base_backoff_s=self.base_backoff_s,
            max_backoff_s=self.max_backoff_s,
            retry_after_s=exc.retry_after_s,
            auth_failed=exc.is_auth,
        )
        serving = "the cached figure" if self._last is not None else "the static fallback"
        if exc.is_auth:
            if not self._auth_logged:
                self._auth_logged = True
                log.error(
                    "Electricity Maps refused the API key (%s): an authentication problem "
                    "that will not fix itself; check ELECTRICITYMAPS_API_KEY and its plan's "
                    "zones. Serving %s, retrying every %g s",
                    message,
                    serving,
                    self._next_delay_s,
                )
            return
        level = logging.WARNING if first or changed else logging.DEBUG
        log.log(
            level,
            "Electricity Maps fetch failed (%d in a row): %s; serving %s, next try in %g s",
            self._failures,
            message,
            serving,
            self._next_delay_s,
        )

    def _redact(self, text: str) -> str:
        return text.replace(self._key.reveal(), _REDACTED)


def _status_message(status: int, body: bytes) -> str:
    """`HTTP 401: Invalid auth-token: <the API's message>`, shortened."""
    what = {401: "authentication failed", 403: "forbidden", 429: "rate limited"}.get(
        status, "server error" if status >= 500 else "unexpected status"
    )
    detail = ""
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict):
        parts = [data.get(k) for k in ("error", "message")]
        detail = ": ".join(p for p in parts if isinstance(p, str) and p)
    if len(detail) > _MAX_DETAIL_CHARS:
        detail = detail[: _MAX_DETAIL_CHARS - 3] + "..."
    return f"HTTP {status} {what}" + (f" ({detail})" if detail else "")
