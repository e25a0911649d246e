"""A small stand-in for the Electricity Maps v3 API (`/v3/carbon-intensity/latest`), an ASGI app.

Run it on a real socket with `tests.support.servers.ServerThread`. The answers keep the real shape:

- success, from the API reference (portal.electricitymaps.com/docs, "carbon-intensity"
  endpoints; the same keys appear in the older static.electricitymaps.com/api/docs):
  `{"zone", "carbonIntensity", "datetime", "updatedAt", "createdAt", "emissionFactorType",
  "isEstimated", "estimationMethod", "temporalGranularity"}`, intensity in gCO2eq/kWh;
- a missing or wrong `auth-token`: 401 with `{"error": "Invalid auth-token", "message": ...}`,
  as described in help.electricitymaps.com "API authentication errors";
- other errors (429, 500, an unknown zone) use the same `{"error", "message"}` shape; that
  part is our guess, the public docs do not show it.

The test controls everything through `FakeGridState` (a plain mutable object; the server
thread reads it per request): the intensity per zone, where lat/lon land, and failure
modes. It counts calls and records each request's query and whether its token was right.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

FAKE_API_KEY = "em-test-key-6f1c0d9a"
FAKE_DATETIME = "2025-01-15T10:00:00.000Z"

# Capital cities, so a lat/lon query lands in a zone (the nearest listed point wins).
DEFAULT_LOCATIONS: tuple[tuple[float, float, str], ...] = (
    (52.52, 13.405, "DE"),
    (48.857, 2.352, "FR"),
    (59.329, 18.069, "SE"),
)


@dataclass
class FakeGridState:
    api_key: str = FAKE_API_KEY
    zones: dict[str, float] = field(default_factory=lambda: {"DE": 350.0, "FR": 50.0, "SE": 20.0})
    locations: tuple[tuple[float, float, str], ...] = DEFAULT_LOCATIONS
    # Failure modes, checked in this order on every (authenticated) call:
    fail_status: int | None = None  # answer with this status and an error JSON
    retry_after: str | None = None  # Retry-After header to send with fail_status
    fail_message: str = "fake failure"
    hang_s: float = 0.0  # sleep this long before answering (client timeouts)
    malformed: bool = False  # answer 200 with a body that is not JSON
    body: dict[str, Any] | None = None  # answer 200 with exactly this JSON object
    # Records:
    calls: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)

    def healthy(self) -> None:
        """Clear every failure mode."""
        self.fail_status = None
        self.retry_after = None
        self.hang_s = 0.0
        self.malformed = False
        self.body = None


def latest_body(zone: str, g_per_kwh: float) -> dict[str, Any]:
    """A `latest` answer in the API's shape."""
    return {
        "zone": zone,
        "carbonIntensity": g_per_kwh,
        "datetime": FAKE_DATETIME,
        "updatedAt": "2025-01-15T10:04:12.345Z",
        "createdAt": "2025-01-12T10:03:58.120Z",
        "emissionFactorType": "lifecycle",
        "isEstimated": True,
        "estimationMethod": "TIME_SLICER_AVERAGE",
        "temporalGranularity": "hourly",
    }


def _error(
    status: int, error: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    return JSONResponse({"error": error, "message": message}, status_code=status, headers=headers)


def make_fake_electricitymaps(
    state: FakeGridState | None = None,
) -> tuple[Starlette, FakeGridState]:
    st = state or FakeGridState()

    async def latest(request: Request) -> Response:
        st.calls += 1
        q = request.query_params
        token_ok = request.headers.get("auth-token") == st.api_key
        st.requests.append({"query": dict(q), "token_ok": token_ok})
        if not token_ok:
            return _error(
                401,
                "Invalid auth-token",
                "The provided token is invalid. If this token used to work, please visit "
                "https://help.electricitymaps.com to get support",
            )
        if st.fail_status is not None:
            headers = {"retry-after": st.retry_after} if st.retry_after is not None else None
            return _error(st.fail_status, "Fake error", st.fail_message, headers)
        if st.hang_s > 0:
            await _hang(request, st.hang_s)
        if st.malformed:
            return Response(b'{"zone": "DE", "carbonIntens', media_type="application/json")
        if st.body is not None:
            return JSONResponse(st.body)
        zone = _zone_of(st, q.get("zone"), q.get("lat"), q.get("lon"))
        if zone is None:
            return _error(400, "Bad request", "Give either zone or lat and lon")
        if zone not in st.zones:
            return _error(404, "Zone not found", f"No data for zone {zone}")
        return JSONResponse(latest_body(zone, st.zones[zone]))

    return Starlette(routes=[Route("/v3/carbon-intensity/latest", latest)]), st


def _zone_of(st: FakeGridState, zone: str | None, lat: str | None, lon: str | None) -> str | None:
    if zone is not None:
        return None if lat is not None or lon is not None else zone
    if lat is None or lon is None:
        return None
    try:
        y, x = float(lat), float(lon)
    except ValueError:
        return None
    return min(st.locations, key=lambda loc: math.hypot(loc[0] - y, loc[1] - x))[2]


async def _hang(request: Request, hang_s: float) -> None:
    # Give up as soon as the client hangs up, so that server shutdown does not wait on us.
    loop = asyncio.get_running_loop()
    until = loop.time() + hang_s
    while loop.time() < until:
        if await request.is_disconnected():
            return
        await asyncio.sleep(0.01)
