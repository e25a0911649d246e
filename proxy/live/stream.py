"""One page's event stream as an HTTP response: `hello`, then what the hub publishes.

A send that the client does not take within SEND_TIMEOUT_S (a page that stopped reading,
its socket buffers full) ends the response: the stream holds no coroutine and no
connection forever, and cannot hold the server's graceful shutdown for its whole timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse
from starlette.types import Send

from proxy.live.feed import LiveFeed
from proxy.live.hub import TooManySubscribers, sse_event

KEEPALIVE_S = 15.0  # a comment on an idle stream, so proxies in between keep it open
SEND_TIMEOUT_S = 10.0


async def live_events(feed: LiveFeed, tenant: str | None, owner: str) -> AsyncIterator[bytes]:
    """The events of one subscriber: `hello` first, then what the feed publishes, a comment
    every KEEPALIVE_S when nothing happens, `dropped` (then the end) if it fell behind.
    Subscribed here, inside the response, so a client that leaves before the first byte
    leaves nothing subscribed."""
    try:
        sub = feed.hub.subscribe(tenant, owner)
    except TooManySubscribers as exc:
        yield sse_event("dropped", {"reason": str(exc)})
        return
    try:
        yield b"retry: 2000\n\n" + sse_event("hello", feed.hello(tenant))
        while True:
            batch = await sub.next_batch(KEEPALIVE_S)
            if sub.dropped:
                yield sse_event("dropped", {"reason": "this stream fell behind; reconnect"})
                return
            if batch:
                yield b"".join(batch)
            if sub.closed:
                return
            if not batch:
                yield b": keepalive\n\n"
    finally:
        feed.hub.unsubscribe(sub)


class LiveStreamResponse(StreamingResponse):
    """`text/event-stream`, each send bounded by SEND_TIMEOUT_S (see the module docstring)."""

    def __init__(self, events: AsyncIterator[bytes]) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    async def stream_response(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        body = self.body_iterator
        try:
            async for chunk in body:
                message = {"type": "http.response.body", "body": chunk, "more_body": True}
                try:
                    await asyncio.wait_for(send(message), SEND_TIMEOUT_S)
                except TimeoutError:
                    # The client takes nothing: give up on it. The response stays
                    # unfinished and the server closes the connection.
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()  # unsubscribes now, not whenever the generator is collected
