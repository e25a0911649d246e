"""The small HTTP interface the backend adapters need, and nothing more.

The proxy's upstream client (proxy/relay/upstream.py) provides it; tests pass a fake. Every
method raises on a transport failure, a status other than 200, or (for JSON) a body that
is not JSON; callers here turn any such failure into "no answer".
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

Headers = dict[str, str] | None  # extra request headers (a backend's own API key)


class JsonGetter(Protocol):
    async def get_json(self, url: str, timeout_s: float, headers: Headers = None) -> object: ...

    async def get_text(self, url: str, timeout_s: float, headers: Headers = None) -> str: ...


@runtime_checkable
class JsonPoster(Protocol):
    """A small JSON POST (a backend's tokenize endpoint); not on the request path."""

    async def post_json(
        self, url: str, body: object, timeout_s: float, headers: Headers = None
    ) -> object: ...


class KeyedGetter:
    """A getter that sends a backend's own API key with every call (discovery, health,
    metrics, tokenize), as the backend started with a key requires."""

    def __init__(self, inner: JsonGetter, api_key: str) -> None:
        self._inner = inner
        self._headers = {"authorization": f"Bearer {api_key}"}

    async def get_json(self, url: str, timeout_s: float, headers: Headers = None) -> object:
        return await self._inner.get_json(url, timeout_s, {**self._headers, **(headers or {})})

    async def get_text(self, url: str, timeout_s: float, headers: Headers = None) -> str:
        return await self._inner.get_text(url, timeout_s, {**self._headers, **(headers or {})})

    async def post_json(
        self, url: str, body: object, timeout_s: float, headers: Headers = None
    ) -> object:
        assert isinstance(self._inner, JsonPoster)
        return await self._inner.post_json(
            url, body, timeout_s, {**self._headers, **(headers or {})}
        )
