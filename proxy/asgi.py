"""ASGI types, and the one way the proxy answers an error of its own."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from proxy.errors import ProxyError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
RawHeaders = list[tuple[bytes, bytes]]

_JSON = (b"content-type", b"application/json")


async def send_error(send: Send, exc: ProxyError, extra: Sequence[tuple[bytes, bytes]]) -> None:
    """An OpenAI-shaped error answer, with `extra` headers (the request ids)."""
    body = exc.body()
    headers = [_JSON, *extra, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
