"""The client that talks to backends: one `send`, two implementations.

`AiohttpUpstream` is the default because it was measured (bench/overhead.py, DESIGN.md):
httpx's connection pool reached 0.07x direct throughput at 64 concurrent requests on
this kind of machine, aiohttp 0.8x. `HttpxUpstream` stays for tests over
`httpx.ASGITransport` (no sockets) and as `--upstream-client httpx`.

Both map their library's errors to the proxy's tree in one place each:
connection failures -> BackendUnreachable (502), timeouts -> BackendTimeout (504).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Protocol

import aiohttp
import httpx
import orjson

from backends.fetch import Headers
from proxy.errors import BackendTimeout, BackendUnreachable
from proxy.relay.upstream_errors import broken_off, unreachable

# A request body: whole, or streamed as it arrives (an upload: sent chunked, or with the
# client's own content-length).
Body = bytes | AsyncIterable[bytes]


class UpstreamResponse(Protocol):
    status: int
    headers: list[tuple[bytes, bytes]]

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as the backend sends it, chunk by chunk, without buffering."""
        ...

    async def next_chunk(self) -> bytes:
        """The next piece of the body as it arrives; b"" at its end (the streaming hot
        path: one await per chunk, no async-iterator layers)."""
        ...

    async def read(self) -> bytes:
        """The whole body (for non-streaming answers, which are one JSON document)."""
        ...

    async def close(self) -> None:
        """Stop reading and drop the connection if the body was not read to the end."""
        ...


class UpstreamClient(Protocol):
    async def send(
        self, method: str, url: str, headers: list[tuple[bytes, bytes]], body: Body
    ) -> UpstreamResponse:
        """Send a request; returns once the response headers have arrived."""
        ...

    async def get_json(self, url: str, timeout_s: float, headers: Headers = None) -> object:
        """A small GET for discovery and health (not on the request path)."""
        ...

    async def get_text(self, url: str, timeout_s: float, headers: Headers = None) -> str:
        """A small GET of a text document (a backend's /metrics; not on the request path)."""
        ...

    async def post_json(
        self, url: str, body: object, timeout_s: float, headers: Headers = None
    ) -> object:
        """A small JSON POST (a backend's tokenize endpoint; not on the request path)."""
        ...

    async def start(self) -> None:
        """Open the connection pool (in the running loop; the app's start-up calls it)."""
        ...

    async def aclose(self) -> None: ...


# --- aiohttp -------------------------------------------------------------------------


class _AiohttpResponse:
    __slots__ = ("_resp", "bytes_read", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = list(resp.raw_headers)
        self.bytes_read = 0  # of the body so far: what an answer broken off had sent

    async def chunks(self) -> AsyncIterator[bytes]:
        while chunk := await self.next_chunk():
            yield chunk

    async def next_chunk(self) -> bytes:
        try:
            chunk = await self._resp.content.readany()
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise BackendTimeout("the backend stopped sending within the timeout") from exc
        except aiohttp.ClientError as exc:
            raise BackendUnreachable(broken_off(exc, self.bytes_read)) from exc
        self.bytes_read += len(chunk)
        return chunk

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise BackendTimeout("the backend did not finish within the timeout") from exc
        except aiohttp.ClientError as exc:
            raise BackendUnreachable(broken_off(exc, None)) from exc

    async def close(self) -> None:
        # close() (not release()) so an unfinished stream's connection is dropped and
        # the backend sees the disconnect and stops generating.
        if not self._resp.content.at_eof():
            self._resp.close()
        else:
            self._resp.release()


class _Fetching:
    """The small JSON/text calls (discovery, health, tokenize, /metrics) of both clients,
    made through each one's `_fetch` (the body of a 200 answer, or UpstreamError)."""

    async def _fetch(
        self, method: str, url: str, timeout_s: float, json_body: object, extra: Headers
    ) -> bytes:
        raise NotImplementedError

    async def get_json(self, url: str, timeout_s: float, headers: Headers = None) -> object:
        return _json_of("GET", url, await self._fetch("GET", url, timeout_s, None, headers))

    async def get_text(self, url: str, timeout_s: float, headers: Headers = None) -> str:
        text = await self._fetch("GET", url, timeout_s, None, headers)
        return text.decode("utf-8", "replace")

    async def post_json(
        self, url: str, body: object, timeout_s: float, headers: Headers = None
    ) -> object:
        return _json_of("POST", url, await self._fetch("POST", url, timeout_s, body, headers))


class AiohttpUpstream(_Fetching):
    """aiohttp `ClientSession` with a keep-alive pool; no cookie jar, no decompression.

    Built anywhere; its session opens in the running loop (aiohttp needs one), at
    `start()` or at the first request, whichever comes first."""

    def __init__(self, timeout_s: float, *, pool_size: int = 0) -> None:
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=min(timeout_s, 30.0), sock_read=timeout_s
        )
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._pool_size, ttl_dns_cache=300),
            timeout=self._timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        return self._session

    async def start(self) -> None:
        if self._session is None or self._session.closed:
            self._open()

    async def send(
        self, method: str, url: str, headers: list[tuple[bytes, bytes]], body: Body
    ) -> _AiohttpResponse:
        hdrs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
        try:
            resp = await (self._session or self._open()).request(
                method, url, data=body, headers=hdrs, allow_redirects=False
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise BackendTimeout("the backend did not answer within the timeout") from exc
        except aiohttp.ClientError as exc:
            raise BackendUnreachable(unreachable(exc, url)) from exc
        return _AiohttpResponse(resp)

    async def _fetch(
        self,
        method: str,
        url: str,
        timeout_s: float,
        json_body: object = None,
        extra: Headers = None,
    ) -> bytes:
        """A small request off the request path (discovery, health, metrics, tokenize)."""
        try:
            # The session skips auto headers (the relay forwards the client's own), so a
            # JSON body states its content type itself.
            data, headers = (
                (None, dict(extra or {}))
                if json_body is None
                else (
                    orjson.dumps(json_body),
                    {"content-type": "application/json", **(extra or {})},
                )
            )
            async with (self._session or self._open()).request(
                method,
                url,
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as resp:
                if resp.status != 200:
                    raise BackendUnreachable(f"{method} {url} answered {resp.status}")
                return await resp.read()
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise BackendTimeout(f"{method} {url} timed out") from exc
        except aiohttp.ClientError as exc:
            raise BackendUnreachable(f"{method} {url} failed: {unreachable(exc, url)}") from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# --- httpx ---------------------------------------------------------------------------


class _HttpxResponse:
    __slots__ = ("_iter", "_resp", "headers", "status")

    def __init__(self, resp: httpx.Response) -> None:
        self._resp = resp
        self._iter: AsyncIterator[bytes] | None = None
        self.status = resp.status_code
        self.headers = list(resp.headers.raw)

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.aiter_raw():
                if chunk:
                    yield chunk
        except httpx.TimeoutException as exc:
            raise BackendTimeout("the backend stopped sending within the timeout") from exc
        except httpx.HTTPError as exc:
            raise BackendUnreachable(f"the backend broke off the response: {exc}") from exc

    async def next_chunk(self) -> bytes:
        if self._iter is None:
            self._iter = aiter(self.chunks())
        return await anext(self._iter, b"")

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

    async def close(self) -> None:
        await self._resp.aclose()


class HttpxUpstream(_Fetching):
    """httpx `AsyncClient`; give it a `transport` (e.g. `ASGITransport`) in tests."""

    def __init__(
        self, timeout_s: float, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0)),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        )

    async def start(self) -> None:
        return None  # httpx's client needs no running loop to be built

    async def send(
        self, method: str, url: str, headers: list[tuple[bytes, bytes]], body: Body
    ) -> _HttpxResponse:
        req = self._client.build_request(method, url, headers=headers, content=body)
        try:
            resp = await self._client.send(req, stream=True)
        except httpx.TimeoutException as exc:
            raise BackendTimeout("the backend did not answer within the timeout") from exc
        except httpx.HTTPError as exc:
            raise BackendUnreachable(f"cannot reach the backend: {exc}") from exc
        return _HttpxResponse(resp)

    async def _fetch(
        self,
        method: str,
        url: str,
        timeout_s: float,
        json_body: object = None,
        extra: Headers = None,
    ) -> bytes:
        try:
            resp = await self._client.request(
                method, url, json=json_body, timeout=timeout_s, headers=extra
            )
        except httpx.TimeoutException as exc:
            raise BackendTimeout(f"{method} {url} timed out") from exc
        except httpx.HTTPError as exc:
            raise BackendUnreachable(f"{method} {url} failed: {exc}") from exc
        if resp.status_code != 200:
            raise BackendUnreachable(f"{method} {url} answered {resp.status_code}")
        return resp.content

    async def aclose(self) -> None:
        await self._client.aclose()


def _json_of(method: str, url: str, body: bytes) -> object:
    try:
        doc: object = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BackendUnreachable(f"{method} {url} did not return JSON") from exc
    return doc


def make_upstream(kind: str, timeout_s: float) -> UpstreamClient:
    if kind == "httpx":
        return HttpxUpstream(timeout_s)
    return AiohttpUpstream(timeout_s)


__all__ = [
    "AiohttpUpstream",
    "HttpxUpstream",
    "UpstreamClient",
    "UpstreamResponse",
    "make_upstream",
]
