"""The HTTP side of the Electricity Maps provider (metering/carbon/electricitymaps.py):
one capped GET over httpx, its failures mapped to ElectricityMapsError in one place.

httpx is fine here: one request an hour, off the request path (DESIGN.md keeps aiohttp
for the hot path only)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import httpx

from metering.carbon.electricitymaps import Answer, ElectricityMapsError


class HttpxFetch:
    """A `LatestFetch` over httpx. Give it a `client` to share one (it is then left open
    at `aclose`); otherwise it makes its own at the first fetch and closes it."""

    def __init__(self, client: httpx.AsyncClient | None = None) -> None:
        self._client = client
        self._own = client is None

    async def get(
        self,
        url: str,
        params: Mapping[str, str],
        headers: Mapping[str, str],
        timeout_s: float,
        max_bytes: int,
    ) -> Answer:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=timeout_s)
        try:
            # httpx's timeout bounds each phase; this bounds the whole exchange.
            async with asyncio.timeout(timeout_s):
                async with self._client.stream(
                    "GET", url, params=dict(params), headers=dict(headers), timeout=timeout_s
                ) as resp:
                    body = await _read_capped(resp, max_bytes)
        except (TimeoutError, httpx.TimeoutException):
            raise ElectricityMapsError(f"timeout after {timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise ElectricityMapsError(f"{type(exc).__name__}: {exc}") from None
        return Answer(
            resp.status_code, body, resp.headers.get("retry-after"), resp.headers.get("date")
        )

    async def aclose(self) -> None:
        if self._own and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


async def _read_capped(resp: httpx.Response, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise ElectricityMapsError(f"answer larger than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
