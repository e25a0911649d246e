"""What watches a metered stream, by the endpoint's event grammar."""

from __future__ import annotations

from typing import Any, Protocol

from proxy.relay.endpoints import MESSAGES, RESPONSES, Endpoint
from proxy.relay.sse import StreamInspector
from proxy.relay.typed_sse import MessagesInspector, ResponsesInspector


class Inspector(Protocol):
    """Per event, what to forward (None: hold back); what it learnt of the request's
    tokens; and, at the end, what to send last (the energy where the API's SDK keeps it)."""

    counted_tokens: int
    usage: dict[str, Any] | None
    usage_chunk: dict[str, Any] | None

    def process(self, event: bytes) -> bytes | None: ...

    def release(self) -> bytes:
        """What waits for the energy, to send now without it."""
        ...

    def closing(
        self, energy: dict[str, Any], failure: dict[str, Any] | None, sep: bytes
    ) -> bytes: ...


def inspector_for(endpoint: Endpoint, client_wants_usage: bool) -> Inspector:
    if endpoint.stream_style == RESPONSES:
        return ResponsesInspector()
    if endpoint.stream_style == MESSAGES:
        return MessagesInspector()
    return StreamInspector(client_wants_usage)
