"""Typed event streams as they pass through the proxy: OpenAI's Responses API and
Anthropic's Messages API. Pure: bytes in, bytes out.

Both name each event (`event: <type>` and a `"type"` in its data) and end with no
`[DONE]`; their usage comes in the last events, so the proxy holds those back, settles
the energy, and sends them on with an `"energy"` object added where each SDK keeps it:

- Responses: the `response` object of `response.completed` (or `.incomplete`/`.failed`),
  which `client.responses.stream(...).get_final_response()` returns and the raw event
  carries (`event.response.energy`);
- Messages: the `message_delta` event (`event.energy`; the usage is there too), then
  `message_stop` as it came.

A stream the backend breaks off, or ends before its last event, gets an `error` event in
the API's own shape, carrying the energy. Other events pass byte for byte.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from proxy.relay.sse import event_data

_RESPONSE_DELTA = re.compile(rb'"type"\s*:\s*"response\.[a-z_.]*delta"')
_RESPONSE_FINAL = re.compile(rb'"type"\s*:\s*"response\.(completed|incomplete|failed)"')
_MESSAGE_TYPE = re.compile(rb'"type"\s*:\s*"(message_start|message_delta|message_stop)"')
_CONTENT_DELTA = re.compile(rb'"type"\s*:\s*"content_block_delta"')


def _named_event(name: bytes, obj: dict[str, Any], sep: bytes) -> bytes:
    line_end = sep[: len(sep) // 2]
    return b"event: " + name + line_end + b"data: " + orjson.dumps(obj) + sep


class ResponsesInspector:
    """Watches a Responses API stream: output deltas, the final response's usage."""

    __slots__ = ("counted_tokens", "final", "usage", "usage_chunk")

    def __init__(self) -> None:
        self.counted_tokens = 0
        self.usage: dict[str, Any] | None = None
        self.usage_chunk: dict[str, Any] | None = None  # no per-request timings here
        self.final: dict[str, Any] | None = None  # the held response.completed event

    def process(self, event: bytes) -> bytes | None:
        data = event_data(event)
        if data is None:
            return event
        if _RESPONSE_DELTA.search(data) is not None:
            self.counted_tokens += 1
            return event
        if _RESPONSE_FINAL.search(data) is None:
            return event
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return event
        response = obj.get("response") if isinstance(obj, dict) else None
        if not isinstance(response, dict):
            return event
        usage = response.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        self.final = obj
        return None

    def release(self) -> bytes:
        return b""  # nothing waits: the energy goes into the last event, which ends it

    def closing(self, energy: dict[str, Any], failure: dict[str, Any] | None, sep: bytes) -> bytes:
        """The held final event with the energy in its `response`; or, when the stream
        failed or ended without one, an `error` event that carries it."""
        if failure is None and self.final is not None:
            self.final["response"]["energy"] = energy
            return _named_event(str(self.final["type"]).encode(), self.final, sep)
        failure = failure or _ended_early("response.completed")
        error = {"type": "error", "code": failure["code"], "message": failure["message"],
                 "param": None, "energy": energy}  # fmt: skip
        return _named_event(b"error", error, sep)


class MessagesInspector:
    """Watches an Anthropic Messages stream: input tokens from `message_start`, output
    tokens from `message_delta` (held back for the energy), then `message_stop`."""

    __slots__ = ("counted_tokens", "delta", "input_usage", "stop", "usage", "usage_chunk")

    def __init__(self) -> None:
        self.counted_tokens = 0
        self.input_usage: dict[str, Any] = {}
        self.usage: dict[str, Any] | None = None
        self.usage_chunk: dict[str, Any] | None = None
        self.delta: dict[str, Any] | None = None  # the held message_delta event
        self.stop: bytes | None = None  # the held message_stop event, as it came

    def process(self, event: bytes) -> bytes | None:
        data = event_data(event)
        if data is None:
            return event
        if _CONTENT_DELTA.search(data) is not None:
            self.counted_tokens += 1
            return event
        m = _MESSAGE_TYPE.search(data)
        if m is None:
            return event
        kind = m.group(1)
        if kind == b"message_stop":
            self.stop = event
            return None
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return event
        if not isinstance(obj, dict):
            return event
        if kind == b"message_start":
            message = obj.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self.input_usage = usage
                self.usage = {**usage}
            return event
        usage = obj.get("usage")
        if isinstance(usage, dict):  # message_delta's counts are totals: they win
            self.usage = {**self.input_usage, **{k: v for k, v in usage.items() if v is not None}}
        self.delta = obj
        return None

    def release(self) -> bytes:
        return b""  # nothing waits: the energy goes into the last event, which ends it

    def closing(self, energy: dict[str, Any], failure: dict[str, Any] | None, sep: bytes) -> bytes:
        """The held `message_delta` with the energy, then `message_stop`; or, when the
        stream failed or ended without them, an `error` event that carries it."""
        if failure is None and self.delta is not None:
            self.delta["energy"] = energy
            out = _named_event(b"message_delta", self.delta, sep)
            return out + (self.stop or b"")
        failure = failure or _ended_early("message_delta")
        error = {"type": "error",
                 "error": {"type": "api_error", "message": failure["message"]},
                 "energy": energy}  # fmt: skip
        return _named_event(b"error", error, sep)


def _ended_early(expected: str) -> dict[str, Any]:
    return {"code": "backend_unreachable", "type": "upstream_error",
            "message": f"the backend ended the stream before its {expected} event"}  # fmt: skip
