"""Fan-out of live events to page clients, never waiting for any of them.

The request path calls `publish` once per finished request: it encodes the event once and
appends it to each subscriber's bounded buffer, O(subscribers), no await, no lock. A
subscriber whose buffer is full (a page that stopped reading, a slow link) is dropped on the
spot: it gets a last `dropped` event when its stream next runs and is closed, and a page
reconnects. So a slow page costs the proxy one bounded buffer, never a request's time.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import orjson

# Events a subscriber may have waiting: a page reading normally holds 0-2; 512 is minutes
# of power samples, or a burst of 500 requests finishing in the same instant.
SUBSCRIBER_BUFFER_EVENTS = 512
MAX_SUBSCRIBERS = 64
# Streams one key may hold (a few tabs), so one key cannot take every slot; without keys
# there is no one to tell apart and only MAX_SUBSCRIBERS holds.
MAX_SUBSCRIBERS_PER_KEY = 8


def sse_event(kind: str, data: Mapping[str, Any] | list[Any]) -> bytes:
    """One server-sent event: `event: KIND` and one `data:` line of JSON (orjson escapes
    newlines inside strings, so the JSON is always one line)."""
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class Subscriber:
    """One page's stream: a bounded buffer and a wake-up."""

    __slots__ = ("buffer", "closed", "dropped", "limit", "owner", "tenant", "wake")

    def __init__(self, tenant: str | None, limit: int, owner: str = "") -> None:
        self.tenant = tenant  # None: sees every tenant's requests
        self.owner = owner  # the key's name ("" without keys)
        self.limit = limit
        self.buffer: deque[bytes] = deque()
        self.dropped = False
        self.closed = False  # the server is stopping: the stream ends
        self.wake = asyncio.Event()

    def offer(self, event: bytes) -> bool:
        """Buffer `event`; False (and dropped) when the buffer was full."""
        if self.dropped:
            return False
        if len(self.buffer) >= self.limit:
            self.dropped = True
            self.buffer.clear()
            self.wake.set()
            return False
        self.buffer.append(event)
        self.wake.set()
        return True

    async def next_batch(self, timeout_s: float) -> list[bytes]:
        """What is buffered, waiting up to `timeout_s` for something ([] on timeout)."""
        if not self.buffer and not self.dropped and not self.closed:
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout_s)
            except TimeoutError:
                return []
        batch = list(self.buffer)
        self.buffer.clear()
        return batch


class TooManySubscribers(Exception):
    """Every slot is taken (MAX_SUBSCRIBERS)."""


class EventHub:
    """Subscribers of the live events; see the module docstring."""

    def __init__(
        self,
        *,
        buffer_events: int = SUBSCRIBER_BUFFER_EVENTS,
        max_subscribers: int = MAX_SUBSCRIBERS,
        max_per_key: int = MAX_SUBSCRIBERS_PER_KEY,
        on_drop: Callable[[], None] | None = None,
    ) -> None:
        self._subscribers: set[Subscriber] = set()
        self.buffer_events = buffer_events
        self.max_subscribers = max_subscribers
        self.max_per_key = max_per_key
        self.dropped_total = 0
        self.closed = False
        self._on_drop = on_drop

    def __len__(self) -> int:
        return len(self._subscribers)

    def room_for(self, owner: str) -> str:
        """Why a new stream for key `owner` ("" without keys) cannot open; "" if it can."""
        if len(self._subscribers) >= self.max_subscribers:
            return f"{self.max_subscribers} live-event streams are open; try again later"
        if owner and sum(s.owner == owner for s in self._subscribers) >= self.max_per_key:
            return f"this key has {self.max_per_key} live-event streams open already"
        return ""

    def subscribe(self, tenant: str | None, owner: str = "") -> Subscriber:
        problem = self.room_for(owner)
        if problem:
            raise TooManySubscribers(problem)
        sub = Subscriber(tenant, self.buffer_events, owner)
        sub.closed = self.closed
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    def close(self) -> None:
        """End every stream (the server is stopping: an open stream would hold its
        graceful shutdown for its whole timeout). Later subscribers end at once."""
        self.closed = True
        for sub in self._subscribers:
            sub.closed = True
            sub.wake.set()

    def publish(self, kind: str, data: Mapping[str, Any], tenant: str | None = None) -> None:
        """To every subscriber allowed to see it: all when `tenant` is None (power, carbon),
        else the tenant's own streams and the unrestricted ones. Never blocks."""
        if not self._subscribers:
            return
        event = sse_event(kind, data)
        for sub in list(self._subscribers):
            if tenant is not None and sub.tenant is not None and sub.tenant != tenant:
                continue
            if not sub.offer(event):
                self._subscribers.discard(sub)
                self.dropped_total += 1
                if self._on_drop is not None:
                    self._on_drop()
