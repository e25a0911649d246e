"""ElectricityMapsIntensity against the fake Electricity Maps API on a real 127.0.0.1 socket.

Freshness and age run on a fake clock; the backoff schedule is tested as a pure function.
Real-time waits are kept tiny and nothing asserts on speed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from metering.carbon.electricitymaps import (
    MAX_RETRY_AFTER_S,
    ElectricityMapsError,
    ElectricityMapsIntensity,
    LatestIntensity,
    next_fetch_delay_s,
    parse_latest,
    parse_retry_after_s,
)
from metering.carbon.intensity import Intensity, IntensityProvider
from proxy.carbon_client import HttpxFetch
from tests.support.fakes.electricitymaps import (
    FAKE_API_KEY,
    FakeGridState,
    latest_body,
    make_fake_electricitymaps,
)
from tests.support.servers import ServerThread


def em_provider(
    *args: Any, client: httpx.AsyncClient | None = None, **kwargs: Any
) -> ElectricityMapsIntensity:
    """The provider as the proxy builds it: with its HTTP client (proxy/carbon_client.py)."""
    return ElectricityMapsIntensity(*args, fetch=HttpxFetch(client), **kwargs)


STATIC_G = 480.0
HOUR_S = 3600.0


class FakeClock:
    def __init__(self, t_s: float = 1000.0) -> None:
        self.t_s = t_s

    def __call__(self) -> float:
        return self.t_s


@pytest.fixture
def grid() -> FakeGridState:
    return FakeGridState()


@pytest.fixture
def api_url(grid: FakeGridState) -> Iterator[str]:
    app, _ = make_fake_electricitymaps(grid)
    with ServerThread(app) as url:
        yield url


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def provider(api_url: str, clock: FakeClock) -> AsyncIterator[ElectricityMapsIntensity]:
    p = em_provider(
        api_url, FAKE_API_KEY, zone="DE", static_g_per_kwh=STATIC_G, clock=clock, timeout_s=5.0
    )
    yield p
    await p.aclose()


def free_port_url() -> str:
    """A URL nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --------------------------------------------------------------------------- the value


async def test_value_arrives(
    provider: ElectricityMapsIntensity, grid: FakeGridState, clock: FakeClock
) -> None:
    assert await provider.refresh_once() is True
    assert provider.current() == Intensity(350.0, "electricitymaps", "DE", age_s=0.0)
    assert provider.failures == 0
    assert provider.last_success_s == clock.t_s
    assert provider.latest is not None and provider.latest.is_estimated is True
    assert grid.requests == [{"query": {"zone": "DE"}, "token_ok": True}]
    clock.t_s += 60.0
    assert provider.current() == Intensity(350.0, "electricitymaps", "DE", age_s=60.0)


def test_it_is_an_intensity_provider() -> None:
    p: IntensityProvider = em_provider("http://x", "k", zone="DE", static_g_per_kwh=1.0)
    assert p.current().source == "fallback"


async def test_fallback_before_any_success(
    provider: ElectricityMapsIntensity, grid: FakeGridState
) -> None:
    assert provider.current() == Intensity(STATIC_G, "fallback", "DE")
    grid.fail_status = 500
    assert await provider.refresh_once() is False
    assert provider.current() == Intensity(STATIC_G, "fallback", "DE")
    assert provider.last_success_s is None
    assert provider.failures == 1


async def test_lat_lon_query(api_url: str, grid: FakeGridState) -> None:
    p = em_provider(
        api_url, FAKE_API_KEY, lat=48.85, lon=2.35, static_g_per_kwh=STATIC_G, clock=FakeClock()
    )
    try:
        assert p.current() == Intensity(STATIC_G, "fallback", "")
        assert await p.refresh_once() is True
    finally:
        await p.aclose()
    assert grid.requests[0]["query"] == {"lat": "48.85", "lon": "2.35"}
    assert p.current() == Intensity(50.0, "electricitymaps", "FR", age_s=0.0)


# --------------------------------------------------------------------------- the schedule


async def test_run_fetches_at_once_and_not_per_current_call(
    api_url: str, grid: FakeGridState
) -> None:
    p = em_provider(api_url, FAKE_API_KEY, zone="DE", static_g_per_kwh=STATIC_G)
    task = asyncio.create_task(p.run())
    try:
        for _ in range(1000):  # poll: the first fetch happens in the background, at once
            if p.last_success_s is not None:
                break
            await asyncio.sleep(0.01)
        for _ in range(500):
            assert p.current().source == "electricitymaps"
        await asyncio.sleep(0.05)
        assert grid.calls == 1
        assert p.next_delay_s == HOUR_S
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


class _Stop(Exception):
    pass


async def test_run_calls_the_api_once_per_refresh_period(api_url: str, grid: FakeGridState) -> None:
    """run() over a fake sleep that advances a fake clock; requests call current() between."""
    clock = FakeClock()
    slept_s: list[float] = []
    seen: list[Intensity] = []
    p: ElectricityMapsIntensity

    async def fake_sleep(delay_s: float) -> None:
        slept_s.append(delay_s)
        for _ in range(100):
            seen.append(p.current())
        clock.t_s += delay_s
        if len(slept_s) == 4:
            raise _Stop

    p = em_provider(
        api_url,
        FAKE_API_KEY,
        zone="DE",
        static_g_per_kwh=STATIC_G,
        clock=clock,
        sleep=fake_sleep,
    )
    with pytest.raises(_Stop):
        await p.run()
    assert grid.calls == 4
    assert slept_s == [HOUR_S] * 4
    assert {i.source for i in seen} == {"electricitymaps"}
    # run() closed the client it made: a further fetch makes a fresh one.
    assert await p.refresh_once() is True
    await p.aclose()


async def test_run_leaves_a_passed_in_client_open(api_url: str) -> None:
    async def stop(_: float) -> None:
        raise _Stop

    async with httpx.AsyncClient() as client:
        p = em_provider(
            api_url,
            FAKE_API_KEY,
            zone="DE",
            static_g_per_kwh=STATIC_G,
            client=client,
            sleep=stop,
        )
        with pytest.raises(_Stop):
            await p.run()
        assert not client.is_closed


# --------------------------------------------------------------------------- outages


async def test_outage_gives_cached_with_age_then_recovery(
    provider: ElectricityMapsIntensity, grid: FakeGridState, clock: FakeClock
) -> None:
    assert await provider.refresh_once()
    t0_s = clock.t_s

    clock.t_s += HOUR_S
    grid.fail_status = 500
    assert await provider.refresh_once() is False
    assert provider.current() == Intensity(350.0, "cached", "DE", age_s=HOUR_S)
    assert provider.failures == 1
    assert "500" in provider.last_error
    assert provider.next_delay_s == 5.0

    clock.t_s += 5.0
    grid.fail_status = None
    grid.hang_s = 0.0
    grid.body = {"zone": "DE"}  # no carbonIntensity: still an outage
    assert await provider.refresh_once() is False
    assert provider.next_delay_s == 10.0
    assert provider.current() == Intensity(350.0, "cached", "DE", age_s=HOUR_S + 5.0)
    assert provider.last_success_s == t0_s

    clock.t_s += 10.0
    grid.healthy()
    grid.zones["DE"] = 300.0
    assert await provider.refresh_once() is True
    assert provider.current() == Intensity(300.0, "electricitymaps", "DE", age_s=0.0)
    assert provider.failures == 0
    assert provider.next_delay_s == HOUR_S
    assert "500" not in provider.last_error  # the last failure's, kept for diagnosis
    assert provider.last_error


async def test_a_value_not_refreshed_for_two_periods_is_cached(
    provider: ElectricityMapsIntensity, clock: FakeClock
) -> None:
    assert await provider.refresh_once()
    clock.t_s += 2 * HOUR_S
    assert provider.current().source == "electricitymaps"
    clock.t_s += 1.0
    assert provider.current() == Intensity(350.0, "cached", "DE", age_s=2 * HOUR_S + 1.0)


async def test_401_is_logged_once_and_retried_at_the_longest_backoff(
    api_url: str, grid: FakeGridState, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    grid.api_key = "the-right-key"
    p = em_provider(api_url, FAKE_API_KEY, zone="DE", static_g_per_kwh=STATIC_G, clock=FakeClock())
    try:
        for _ in range(3):
            assert await p.refresh_once() is False
    finally:
        await p.aclose()
    assert p.failures == 3
    assert p.last_error.startswith("HTTP 401")
    assert "Invalid auth-token" in p.last_error
    assert p.next_delay_s == HOUR_S
    auth_logs = [r for r in caplog.records if "authentication problem" in r.getMessage()]
    assert len(auth_logs) == 1
    assert auth_logs[0].levelno == logging.ERROR
    assert p.current().source == "fallback"


async def test_429_honours_retry_after(
    provider: ElectricityMapsIntensity, grid: FakeGridState
) -> None:
    grid.fail_status = 429
    grid.retry_after = "120"
    assert await provider.refresh_once() is False
    assert provider.last_error.startswith("HTTP 429 rate limited")
    assert provider.next_delay_s == 120.0
    grid.retry_after = None
    assert await provider.refresh_once() is False
    assert provider.next_delay_s == 10.0


@pytest.mark.parametrize(
    ("failures", "kwargs", "expected_s"),
    [
        (0, {}, HOUR_S),
        (1, {}, 5.0),
        (2, {}, 10.0),
        (3, {}, 20.0),
        (10, {}, 2560.0),
        (11, {}, HOUR_S),  # 5120 capped at max_backoff_s = refresh_s
        (10_000, {}, HOUR_S),  # no float overflow however long the outage
        (1, {"retry_after_s": 120.0}, 120.0),
        (4, {"retry_after_s": 1.0}, 40.0),  # Retry-After is a lower bound, not a target
        (1, {"auth_failed": True}, HOUR_S),
        (1, {"auth_failed": True, "max_backoff_s": 600.0}, 600.0),
        (3, {"base_backoff_s": 1.0, "max_backoff_s": 3.0}, 3.0),
        (0, {"retry_after_s": 99.0}, HOUR_S),
    ],
)
def test_next_fetch_delay(failures: int, kwargs: dict[str, Any], expected_s: float) -> None:
    assert next_fetch_delay_s(failures, refresh_s=HOUR_S, **kwargs) == expected_s


@pytest.mark.parametrize(
    ("value", "date", "expected_s"),
    [
        (None, None, None),
        ("", None, None),
        ("120", None, 120.0),
        (" 7 ", None, 7.0),
        ("0", None, 0.0),
        ("-3", None, None),
        ("1.5", None, None),
        ("soon", None, None),
        ("99999999", None, MAX_RETRY_AFTER_S),
        ("Wed, 15 Jan 2025 10:02:00 GMT", "Wed, 15 Jan 2025 10:00:00 GMT", 120.0),
        ("Wed, 15 Jan 2025 09:00:00 GMT", "Wed, 15 Jan 2025 10:00:00 GMT", 0.0),
        ("Wed, 15 Jan 2025 10:02:00 GMT", None, None),  # no Date to measure against
        ("Wed, 15 Jan 2025 10:02:00 GMT", "garbage", None),
    ],
)
def test_parse_retry_after(value: str | None, date: str | None, expected_s: float | None) -> None:
    assert parse_retry_after_s(value, date) == expected_s


async def test_retry_after_as_http_date_over_the_socket(
    provider: ElectricityMapsIntensity, grid: FakeGridState
) -> None:
    # uvicorn stamps a Date header; a Retry-After far in the future is clamped to a day.
    grid.fail_status = 429
    grid.retry_after = "Fri, 31 Dec 9999 23:59:59 GMT"
    assert await provider.refresh_once() is False
    assert provider.next_delay_s == MAX_RETRY_AFTER_S


async def test_malformed_json(provider: ElectricityMapsIntensity, grid: FakeGridState) -> None:
    grid.malformed = True
    assert await provider.refresh_once() is False
    assert "malformed JSON" in provider.last_error
    assert provider.current().source == "fallback"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"not json", "malformed JSON"),
        (b"\xff\xfe", "malformed JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"zone": "DE"}', "no carbonIntensity"),
        (b'{"carbonIntensity": null}', "no carbonIntensity"),
        (b'{"carbonIntensity": "350"}', "not a number"),
        (b'{"carbonIntensity": true}', "not a number"),
        (b'{"carbonIntensity": -1}', "finite number >= 0"),
        (b'{"carbonIntensity": NaN}', "finite number >= 0"),
        (b'{"carbonIntensity": Infinity}', "finite number >= 0"),
    ],
)
def test_parse_latest_refuses(body: bytes, error: str) -> None:
    with pytest.raises(ElectricityMapsError, match=error):
        parse_latest(body)


def test_parse_latest_reads_the_real_shape() -> None:
    import json

    body = json.dumps(latest_body("DE", 322)).encode()
    assert parse_latest(body) == LatestIntensity(
        322.0, "DE", datetime="2025-01-15T10:00:00.000Z", is_estimated=True
    )
    assert parse_latest(b'{"carbonIntensity": 0}') == LatestIntensity(0.0, "")


@pytest.mark.parametrize(
    "body",
    [{"zone": "DE", "carbonIntensity": -5}, {"zone": "DE", "carbonIntensity": "high"}],
)
async def test_bad_intensity_over_the_socket(
    provider: ElectricityMapsIntensity, grid: FakeGridState, body: dict[str, Any]
) -> None:
    grid.body = body
    assert await provider.refresh_once() is False
    assert "carbonIntensity" in provider.last_error


async def test_timeout(api_url: str, grid: FakeGridState) -> None:
    grid.hang_s = 5.0
    p = em_provider(api_url, FAKE_API_KEY, zone="DE", static_g_per_kwh=STATIC_G, timeout_s=0.1)
    try:
        assert await p.refresh_once() is False
    finally:
        await p.aclose()
    assert p.last_error == "timeout after 0.1 s"
    assert p.next_delay_s == 5.0


async def test_connection_refused() -> None:
    p = em_provider(free_port_url(), FAKE_API_KEY, zone="DE", static_g_per_kwh=STATIC_G)
    try:
        assert await p.refresh_once() is False
    finally:
        await p.aclose()
    assert p.last_error.startswith("ConnectError")
    assert p.current() == Intensity(STATIC_G, "fallback", "DE")


async def test_unknown_zone(api_url: str) -> None:
    p = em_provider(api_url, FAKE_API_KEY, zone="XX", static_g_per_kwh=STATIC_G)
    try:
        assert await p.refresh_once() is False
    finally:
        await p.aclose()
    assert p.last_error == "HTTP 404 unexpected status (Zone not found: No data for zone XX)"


async def test_an_unforeseen_error_does_not_end_run() -> None:
    def boom(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("boom")

    async with httpx.AsyncClient(transport=httpx.MockTransport(boom)) as client:
        p = em_provider("http://api", FAKE_API_KEY, zone="DE", static_g_per_kwh=1.0, client=client)
        assert await p.refresh_once() is False
    assert p.last_error == "unexpected RuntimeError: boom"


# --------------------------------------------------------------------------- the key


async def test_the_key_never_appears_in_logs_errors_or_repr(
    api_url: str, grid: FakeGridState, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # httpx and httpcore included
    key = "em-secret-0123456789abcdef"
    grid.api_key = key
    clock = FakeClock()
    texts: list[str] = []

    def make(url: str, **kwargs: Any) -> ElectricityMapsIntensity:
        p = em_provider(url, key, static_g_per_kwh=STATIC_G, clock=clock, timeout_s=0.2, **kwargs)
        texts.append(repr(p))
        return p

    async def attempt(p: ElectricityMapsIntensity) -> None:
        await p.refresh_once()
        texts.extend([p.last_error, repr(p), repr(p.current()), repr(p.latest)])

    p = make(api_url, zone="DE")
    try:
        await attempt(p)  # success
        for status, retry_after in ((500, None), (429, "3"), (403, None)):
            grid.fail_status, grid.retry_after = status, retry_after
            await attempt(p)
        grid.fail_status, grid.fail_message = 500, f"server echoed {key}"
        await attempt(p)
        assert "<redacted>" in p.last_error
        grid.healthy()
        grid.malformed = True
        await attempt(p)
        grid.healthy()
        grid.hang_s = 2.0  # a timeout
        await attempt(p)
        grid.healthy()
        grid.api_key = "another-key"  # 401
        await attempt(p)
        await attempt(p)
    finally:
        await p.aclose()
    refused = make(free_port_url(), lat=1.0, lon=2.0)
    try:
        await attempt(refused)
    finally:
        await refused.aclose()

    bad_kwargs: list[dict[str, Any]] = [
        {},
        {"zone": "DE", "lat": 1.0},
        {"zone": "DE", "refresh_s": 0.0},
    ]
    for kwargs in bad_kwargs:
        with pytest.raises(ValueError) as info:
            em_provider(api_url, key, static_g_per_kwh=1.0, **kwargs)
        texts.append(str(info.value))
    with pytest.raises(ValueError) as info:
        em_provider(api_url, key + "\n", zone="DE", static_g_per_kwh=1.0)
    texts.append(str(info.value))

    assert grid.calls >= 8
    assert any("HTTP 401" in t for t in texts)
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    assert key not in caplog.text
    for record in caplog.records:
        assert key not in record.getMessage()
        assert key not in repr(record.args)
    for text in texts:
        assert key not in text


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "zone, or both lat and lon"),
        ({"lat": 1.0}, "zone, or both lat and lon"),
        ({"lon": 1.0}, "zone, or both lat and lon"),
        ({"zone": "DE", "lat": 1.0, "lon": 2.0}, "not both"),
        ({"zone": "DE", "lon": 2.0}, "not both"),
        ({"zone": " "}, "must not be empty"),
        ({"lat": 91.0, "lon": 0.0}, "latitude"),
        ({"lat": 0.0, "lon": float("nan")}, "longitude"),
        ({"zone": "DE", "static_g_per_kwh": -1.0}, "static_g_per_kwh"),
        ({"zone": "DE", "refresh_s": 0.0}, "refresh_s"),
        ({"zone": "DE", "timeout_s": -1.0}, "timeout_s"),
        ({"zone": "DE", "max_backoff_s": float("inf")}, "max_backoff_s"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    kwargs.setdefault("static_g_per_kwh", 1.0)
    with pytest.raises(ValueError, match=match):
        em_provider("http://api", "k", **kwargs)


@pytest.mark.parametrize(
    ("key", "match"), [("", "no Electricity Maps API key"), ("a b", "not allowed")]
)
def test_bad_key(key: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        em_provider("http://api", key, zone="DE", static_g_per_kwh=1.0)


def test_repr_names_the_place_not_the_key() -> None:
    p = em_provider("http://api/", "k3y", lat=1.5, lon=-2.0, static_g_per_kwh=1.0)
    assert repr(p) == "ElectricityMapsIntensity('http://api', lat=1.5, lon=-2.0, failures=0)"
