"""Server-sent events as they pass through the proxy. Pure: bytes in, bytes out.

The relay forwards every event of the backend's stream as soon as it is complete, with
four exceptions: the backend's usage chunk is kept back unless the client asked for
usage, `data: [DONE]` is held until the energy event has gone out before it, a
`"usage": null` field the proxy caused (by asking for usage) is removed again, and the
chunk that ends the last choice (its `finish_reason`), with what follows it that carries
no output (the usage chunk), waits for the end of the stream to carry the `energy`
object too: client libraries that rebuild a stream from its choices (litellm) keep a
chunk's unknown fields only where it has choices. What it waits is the time from the
backend's last token to the end of its stream (microseconds for vLLM: the usage chunk
and `[DONE]` follow at once); output after it (another choice, n > 1) sends it on, and
so does the relay (`release`) before a piece of an oversized event and before a slow
count of the prompt's tokens.
Events are not re-encoded: the bytes the backend sent are the bytes the client gets,
`"energy": {...}` added last in that one chunk.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

from proxy.errors import error_body

# An event ends with a blank line; servers differ in line endings (sse-starlette: CRLF).
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_USAGE_NULL = (b',"usage":null', b', "usage": null', b'"usage":null,', b'"usage": null, ')


# An event longer than this is no event a server sends (one token's chunk is a few
# hundred bytes; a long tool call's a few kilobytes): its bytes are relayed as they come,
# unparsed, up to its end; the events after it are parsed again, the energy still sent.
MAX_EVENT_BYTES = 4 * 1024 * 1024
# An event (bytes), or a piece of one given up (memoryview), relayed as it came.
Piece = bytes | memoryview


class SseSplitter:
    """Cuts a byte stream into complete events, each with its terminating blank line.
    Linear in the bytes: an event that spans many chunks is searched only where each new
    chunk begins, and joined once, when it ends. An event past MAX_EVENT_BYTES is given
    up: its bytes so far and up to its end come back as `memoryview`s, to be relayed
    unparsed, and `raw` is set (the caller clears it); the splitting goes on after it."""

    __slots__ = ("_parts", "_size", "_skipping", "_tail", "raw", "separator")

    def __init__(self) -> None:
        self._parts: list[bytes] = []  # an unfinished event, in the chunks it came in
        self._size = 0
        self._tail = b""  # its last three bytes: where its end may begin
        self._skipping = False  # inside an event given up, relayed as it comes
        self.separator = b"\n\n"
        self.raw = False

    def feed(self, chunk: bytes) -> list[Piece]:
        if self._parts or self._skipping:
            return self._feed_pending(chunk)
        if b"\r" not in chunk:
            return self._feed_lf(chunk)
        return self._split_cr(chunk)

    def _split(self, buf: bytes) -> list[Piece]:
        return self._feed_lf(buf) if b"\r" not in buf else self._split_cr(buf)

    def _split_cr(self, buf: bytes) -> list[Piece]:
        m = _EVENT_END.search(buf)
        if m is None:
            return self._hold(buf)
        self.separator = m.group()
        if m.end() == len(buf):  # the common case: one whole event per chunk
            return [buf]
        events: list[Piece] = [buf[: m.end()]]
        pos = m.end()
        while (m := _EVENT_END.search(buf, pos)) is not None:
            events.append(buf[pos : m.end()])
            pos = m.end()
        return events + self._hold(buf[pos:])

    def _feed_lf(self, buf: bytes) -> list[Piece]:
        # No CR anywhere: the regex reduces to a plain search for LF LF, which `find` does
        # several times faster (most servers end lines with LF alone).
        end = buf.find(b"\n\n")
        if end < 0:
            return self._hold(buf)
        self.separator = b"\n\n"
        end += 2
        if end == len(buf):
            return [buf]
        events: list[Piece] = []
        pos = 0
        while end >= 2:
            events.append(buf[pos:end])
            pos = end
            end = buf.find(b"\n\n", pos) + 2
        return events + self._hold(buf[pos:])

    def _hold(self, rest: bytes) -> list[Piece]:
        """Keep `rest`, the start of an event not yet ended; [] (no event is complete), or
        its bytes to relay if it is already past the limit."""
        if rest:
            self._parts = [rest]
            self._size = len(rest)
            self._tail = rest[-3:]
            if self._size > MAX_EVENT_BYTES:
                return self._give_up()
        return []

    def _feed_pending(self, chunk: bytes) -> list[Piece]:
        # The event's end can straddle the chunks: search the new chunk with the three
        # bytes before it, no further back.
        tail = self._tail
        m = _EVENT_END.search(tail + chunk)
        if m is None:
            self._tail = (tail + chunk)[-3:]
            if self._skipping:
                self.raw = True
                return [memoryview(chunk)]
            self._parts.append(chunk)
            self._size += len(chunk)
            if self._size > MAX_EVENT_BYTES:
                return self._give_up()
            return []
        end = m.end() - len(tail)  # where the event ends in `chunk` (at least 1)
        if self._skipping:
            self._skipping, self._tail = False, b""
            self.raw = True
            out: list[Piece] = [memoryview(chunk)[:end]]
            return out + self._split(chunk[end:]) if end < len(chunk) else out
        buf = b"".join(self._parts) + chunk
        self._parts, self._size, self._tail = [], 0, b""
        return self._split(buf)

    def _give_up(self) -> list[Piece]:
        held = b"".join(self._parts)
        self._parts, self._size = [], 0
        self._skipping = True
        self.raw = True
        return [memoryview(held)]

    def rest(self) -> bytes:
        """Whatever is left unterminated when the stream ends (nothing of an event given
        up: its bytes went out as they came)."""
        rest = b"".join(self._parts)
        self._parts, self._size, self._tail = [], 0, b""
        return rest


def relay_pieces(
    pieces: list[Piece],
    process: Callable[[bytes], bytes | None],
    release: Callable[[], bytes] | None = None,
) -> bytes:
    """The bytes to send for `pieces`: each event as `process` keeps it, each piece of an
    event given up as it came (after what `release` gives of what waited: in order)."""
    out = []
    for p in pieces:
        if isinstance(p, memoryview):
            if release is not None:
                out.append(release())
            out.append(bytes(p))
        elif (kept := process(p)) is not None:
            out.append(kept)
    return b"".join(out)


def event_data(event: bytes) -> bytes | None:
    """The `data:` payload of one event (lines joined by newline), or None if it has none."""
    if event.startswith(b"data:") and event.count(b"\n") <= 2:
        return event[5:].strip()  # one data line: the usual shape, without a split
    parts = [
        line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")
    ]
    if not parts:
        return None
    return b"\n".join(parts)


# Generated output in a chunk: a key whose value is a non-empty string. JSON escapes quotes
# inside strings, so these patterns cannot match text the model wrote.
_OUTPUT = re.compile(rb'"(?:content|text|reasoning_content|arguments)"\s*:\s*"(?!")')
# What waits after a finish chunk at most (a usage chunk is under a kilobyte): past it,
# sent on without the energy.
MAX_HELD_BYTES = 64 * 1024
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')


class StreamInspector:
    """Watches a chat/completions stream: usage, tokens, the end marker, a chunk template.

    Per event it runs two byte searches and parses JSON only where it must (the first
    chunk, for the template of the final event; a chunk carrying a usage object).
    Tokens counted by the proxy are the output-carrying choices of the chunks, which is
    one per token for the servers that send no usage (llama.cpp's servers, some TGI).
    """

    __slots__ = (
        "client_wants_usage",
        "counted_tokens",
        "done",
        "held",
        "held_bytes",
        "template",
        "usage",
        "usage_chunk",
    )

    def __init__(self, client_wants_usage: bool) -> None:
        self.client_wants_usage = client_wants_usage
        self.usage: dict[str, Any] | None = None
        # The chunk that carried the usage, parsed: where backends put a request's
        # timings (vLLM's `metrics`, llama.cpp's `timings`).
        self.usage_chunk: dict[str, Any] | None = None
        self.counted_tokens = 0
        self.done = False
        self.template: dict[str, Any] | None = None
        # A finish chunk first, then what came after it without output.
        self.held: list[bytes] = []
        self.held_bytes = 0

    def closing(self, energy: dict[str, Any], failure: dict[str, Any] | None, sep: bytes) -> bytes:
        if self.held:
            self.held[0] = with_energy(self.held[0], energy)
        return self.release() + chunk_stream_closing(self, energy, failure, sep)

    def process(self, event: bytes) -> bytes | None:
        """What to forward for this event (None: hold it back)."""
        out = self._forward(event)
        if out is None:
            return None
        at = event.find(b'"finish_reason":') + 16
        # Past the key, a quote or a space (a reason, maybe), or the usual `null`.
        if 15 < at < len(event) and event[at] in b'" ' and _reason_follows(event, at):
            return self._finished(out)
        if self.held:
            return self._after_finish(event, out)
        return out  # the usual: a chunk of output, nothing waiting

    def release(self) -> bytes:
        """What waits, to send now without the energy (the relay cannot wait longer: a
        piece of an event given up follows, or the energy needs a slow count first)."""
        held = self.held
        if not held:
            return b""
        self.held, self.held_bytes = [], 0
        return b"".join(held)

    def _finished(self, out: bytes) -> bytes | None:
        """A finish chunk waits for the end (`closing`); one that waited already (another
        choice's) is sent on."""
        before = self.release()
        self.held, self.held_bytes = [out], len(out)
        return before or None

    def _after_finish(self, event: bytes, out: bytes) -> bytes | None:
        """What follows a finish chunk with no output waits with it; output sends what
        waited on before it."""
        held = self.held
        if _OUTPUT.search(event) is None and self.held_bytes + len(out) <= MAX_HELD_BYTES:
            held.append(out)
            self.held_bytes += len(out)
            return None
        return self.release() + out

    def _forward(self, event: bytes) -> bytes | None:
        data = event_data(event)
        if data is None:
            return event  # comments and keep-alives pass as they are
        if data == b"[DONE]":
            self.done = True
            return None
        self.counted_tokens += len(_OUTPUT.findall(data))
        usage_key = b'"usage"' in data
        has_usage = usage_key and _USAGE_OBJECT.search(data) is not None
        if self.template is None or has_usage:
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                return event
            if not isinstance(obj, dict):
                return event
            # Keyed on "choices", not "id": TGI sends "id": "" on every chunk.
            if self.template is None and "choices" in obj:
                self.template = {
                    k: obj[k] for k in ("id", "object", "created", "model") if k in obj
                }
            usage = obj.get("usage")
            if isinstance(usage, dict):
                self.usage, self.usage_chunk = usage, obj
                if not obj.get("choices") and not self.client_wants_usage:
                    return None
                return event
        if usage_key and not self.client_wants_usage:
            for pattern in _USAGE_NULL:
                if pattern in event:
                    return event.replace(pattern, b"", 1)
        return event


def chunk_stream_closing(
    inspector: StreamInspector, energy: dict[str, Any], failure: dict[str, Any] | None, sep: bytes
) -> bytes:
    """The end of a chunk stream: the energy event, then the backend's failure as an error
    event (if it failed), then `data: [DONE]` if the backend sent one. The energy comes
    first: an SDK raises at an error event (the `openai` client does), and an app that
    catches it has already been given the energy chunk; the error event carries the same
    `energy` object beside its message, for the app that only sees the exception."""
    final = energy_event(inspector.template, energy, sep)
    if failure is not None:
        final += b"data: " + error_body(
            failure["message"], failure["type"], failure["code"], energy=energy
        )
        final += sep
    if inspector.done:
        final += done_event(sep)
    return final


def _reason_follows(event: bytes, at: int) -> bool:
    """Whether the value at `at` (after `"finish_reason":`) is a reason: a non-empty
    string, not null."""
    if event[at : at + 1] == b" ":
        at += 1
    return event[at : at + 1] == b'"' and event[at + 1 : at + 2] != b'"'


def with_energy(event: bytes, energy: dict[str, Any]) -> bytes:
    """A chunk's event with `"energy"` added last in its JSON object, its bytes otherwise
    as they came (one an upstream energy-proxy put there replaced); as it came where it
    is not one `data:` line holding an object."""
    body = event.rstrip(b"\r\n")
    end = body.rfind(b"}")
    if not body.startswith(b"data:") or b"\n" in body or b"\r" in body or end != len(body) - 1:
        return event
    if b'"energy"' in body:
        try:
            obj = orjson.loads(body[5:])
        except orjson.JSONDecodeError:
            return event
        if not isinstance(obj, dict):
            return event
        obj["energy"] = energy
        return b"data: " + orjson.dumps(obj) + event[len(body) :]
    return event[:end] + b',"energy":' + orjson.dumps(energy) + event[end:]


def energy_event(template: dict[str, Any] | None, energy: dict[str, Any], sep: bytes) -> bytes:
    """The proxy's final event: a chunk with no choices and the `"energy"` object."""
    chunk: dict[str, Any] = dict(template or {})
    chunk["choices"] = []
    chunk["energy"] = energy
    return b"data: " + orjson.dumps(chunk) + sep


def done_event(sep: bytes) -> bytes:
    return b"data: [DONE]" + sep
