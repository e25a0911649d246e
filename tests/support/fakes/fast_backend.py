"""A fast fake OpenAI-compatible backend, for benchmarking the proxy rather than the fake.

    python tests/support/fakes/fast_backend.py --host 127.0.0.1 --port 9000 \
        [--tokens 16] [--token-delay-ms 0]

Endpoints:
  GET  /v1/models             one model, id "fake-model"
  GET  /health                200 (what vLLM and TGI offer, for readiness probes)
  POST /v1/chat/completions   chat.completion, or an SSE stream of chat.completion.chunk
  POST /v1/completions        text_completion, or an SSE stream of text_completion chunks
  POST /v1/embeddings         a list of embeddings of about --embeddings-bytes in all (usage
                              last, as OpenAI and vLLM send it)

Why it is built this way: every microsecond the fake spends is a microsecond the proxy does
not get on a 2-core machine, so the fake is a raw asyncio.Protocol HTTP/1.1 server (httptools
parser, uvloop when installed) and every response is pre-encoded bytes built at start-up.
Measured here with wrk against the same endpoint on aiohttp.web (same pre-encoded bodies):
p50 at -c 1 0.09 ms vs 0.17 ms; requests/s at -c 64 3-4x non-streaming and over 10x
streaming (aiohttp awaits every event write). So the raw server was kept.

Cheap shortcuts (fine for a benchmark, wrong for anything else):
  * The body is not JSON-decoded. ``"stream": true`` and ``"include_usage": true`` are found
    with a byte regex, so a prompt that contains those strings would fool it.
  * ``max_tokens`` and the prompt are ignored: every answer has ``--tokens`` tokens and a fixed
    ``prompt_tokens``.
  * With ``--token-delay-ms 0`` there is no time between tokens, so a stream's events are
    handed to the socket in one write (each is still its own HTTP chunk). With a delay, each
    event is written, and so flushed, on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import re
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import httptools

MODEL_ID = "fake-model"
PROMPT_TOKENS = 9
TOKEN_TEXT = " tok"

# Byte patterns instead of a JSON decode: see the module docstring.
_STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
_INCLUDE_USAGE_RE = re.compile(rb'"include_usage"\s*:\s*true')


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _http_head(status: str, content_type: str, length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n").encode()


def _fixed(status: str, obj: Any) -> bytes:
    body = _dumps(obj)
    return _http_head(status, "application/json", len(body)) + body


def _chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


@dataclass(frozen=True)
class Streamed:
    """A streamed response: the head, one HTTP chunk per SSE event, then the terminator."""

    head: bytes
    events: tuple[bytes, ...]
    tokens: int  # events[:tokens] are tokens; the rest (usage, [DONE]) follow at once
    tail: bytes = b"0\r\n\r\n"

    def whole(self) -> bytes:
        return self.head + b"".join(self.events) + self.tail


def _usage(tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": tokens,
        "total_tokens": PROMPT_TOKENS + tokens,
    }


def _chat_choice_delta(i: int, tokens: int) -> dict[str, Any]:
    delta: dict[str, Any] = {"content": TOKEN_TEXT}
    if i == 0:
        delta = {"role": "assistant", "content": TOKEN_TEXT}
    finish = "length" if i == tokens - 1 else None
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _text_choice_delta(i: int, tokens: int) -> dict[str, Any]:
    finish = "length" if i == tokens - 1 else None
    return {"index": 0, "text": TOKEN_TEXT, "logprobs": None, "finish_reason": finish}


def _stream(
    base: dict[str, Any],
    choice: Callable[[int, int], dict[str, Any]],
    tokens: int,
    include_usage: bool,
) -> Streamed:
    """OpenAI's stream shape: with include_usage, every chunk has "usage": null and one last
    chunk carries the usage with "choices": []."""
    extra: dict[str, Any] = {"usage": None} if include_usage else {}
    events = [
        _chunk(_sse({**base, "choices": [choice(i, tokens)], **extra})) for i in range(tokens)
    ]
    if include_usage:
        events.append(_chunk(_sse({**base, "choices": [], "usage": _usage(tokens)})))
    events.append(_chunk(b"data: [DONE]\n\n"))
    return Streamed(_http_head("200 OK", "text/event-stream", None), tuple(events), tokens)


@dataclass(frozen=True)
class Responses:
    """Every response the fake can send, encoded once at start-up."""

    models: bytes
    health: bytes
    not_found: bytes
    bad_request: bytes
    chat: bytes
    text: bytes
    chat_stream: Streamed
    chat_stream_usage: Streamed
    text_stream: Streamed
    text_stream_usage: Streamed
    embeddings: bytes = b""


def build_responses(tokens: int, created: int) -> Responses:
    content = TOKEN_TEXT * tokens
    chat_base = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": created,
        "model": MODEL_ID,
    }
    text_base = {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": created,
        "model": MODEL_ID,
    }
    chat = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": created,
        "model": MODEL_ID,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": "length",
            }
        ],
        "usage": _usage(tokens),
    }
    text = {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": created,
        "model": MODEL_ID,
        "choices": [{"index": 0, "text": content, "logprobs": None, "finish_reason": "length"}],
        "usage": _usage(tokens),
    }
    models = {
        "object": "list",
        "data": [{"id": MODEL_ID, "object": "model", "created": created, "owned_by": "fake"}],
    }
    return Responses(
        models=_fixed("200 OK", models),
        health=_fixed("200 OK", {"status": "ok"}),
        not_found=_fixed("404 Not Found", _error("not found", "not_found_error")),
        bad_request=_fixed("400 Bad Request", _error("bad request", "invalid_request_error")),
        chat=_fixed("200 OK", chat),
        text=_fixed("200 OK", text),
        chat_stream=_stream(chat_base, _chat_choice_delta, tokens, include_usage=False),
        chat_stream_usage=_stream(chat_base, _chat_choice_delta, tokens, include_usage=True),
        text_stream=_stream(text_base, _text_choice_delta, tokens, include_usage=False),
        text_stream_usage=_stream(text_base, _text_choice_delta, tokens, include_usage=True),
    )


def embeddings_answer(size_bytes: int, dims: int = 1024) -> bytes:
    """An embeddings list of about `size_bytes` of JSON: as many vectors as it takes."""
    vector = _dumps([0.012345678 * (i % 97 - 48) for i in range(dims)])
    item_prefix = b'{"object":"embedding","index":'
    per_item = len(item_prefix) + len(vector) + 24
    n = max(1, size_bytes // per_item)
    items = b",".join(
        item_prefix + str(i).encode() + b',"embedding":' + vector + b"}" for i in range(n)
    )
    usage = _dumps({"prompt_tokens": n, "total_tokens": n})
    body = (b'{"object":"list","data":[' + items + b'],"model":"' + MODEL_ID.encode()
            + b'","usage":' + usage + b"}")  # fmt: skip
    return _http_head("200 OK", "application/json", len(body)) + body


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": None}}


def choose(r: Responses, method: bytes, path: bytes, body: bytes) -> bytes | Streamed:
    """Route one request to its pre-encoded response."""
    if method == b"POST" and path in (b"/v1/chat/completions", b"/v1/completions"):
        chat = path == b"/v1/chat/completions"
        if not _STREAM_RE.search(body):
            return r.chat if chat else r.text
        usage = _INCLUDE_USAGE_RE.search(body) is not None
        if chat:
            return r.chat_stream_usage if usage else r.chat_stream
        return r.text_stream_usage if usage else r.text_stream
    if method == b"POST" and path == b"/v1/embeddings" and r.embeddings:
        return r.embeddings
    if method == b"GET" and path == b"/v1/models":
        return r.models
    if method == b"GET" and path == b"/health":
        return r.health
    return r.not_found


class FakeBackendProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection: keep-alive, pipelining-safe, responses sent in order."""

    def __init__(self, responses: Responses, tokens: int, token_delay_s: float) -> None:
        self._r = responses
        self._tokens = tokens
        self._delay_s = token_delay_s
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []
        # Requests that arrived while a delayed response is still being sent.
        self._queue: deque[tuple[bytes | Streamed, bool]] = deque()
        self._busy = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, so cast, not isinstance.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._queue.clear()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._enqueue(self._r.bad_request, keep_alive=False)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        path = self._url.split(b"?", 1)[0]
        method = self._parser.get_method()
        response = choose(self._r, method, path, b"".join(self._body))
        self._enqueue(response, self._parser.should_keep_alive())

    # sending
    def _enqueue(self, response: bytes | Streamed, keep_alive: bool) -> None:
        if self._busy:
            self._queue.append((response, keep_alive))
            return
        self._send(response, keep_alive)

    def _send(self, response: bytes | Streamed, keep_alive: bool) -> None:
        t = self._transport
        if t is None:
            return
        if self._delay_s <= 0:
            # The fast path: one write, no timers.
            t.write(response.whole() if isinstance(response, Streamed) else response)
            self._finish(keep_alive)
            return
        # Slow path: one response at a time per connection, paced by timers (no tasks).
        self._busy = True
        t.pause_reading()
        loop = asyncio.get_running_loop()
        if isinstance(response, Streamed):
            t.write(response.head)
            loop.call_later(self._delay_s, self._send_event, response, 0, keep_alive)
        else:
            # Non-streaming: the whole generation time, then the answer.
            loop.call_later(self._delay_s * self._tokens, self._send_later, response, keep_alive)

    def _send_event(self, s: Streamed, i: int, keep_alive: bool) -> None:
        t = self._transport
        if t is None:
            return
        if i == len(s.events):
            t.write(s.tail)
            self._done_delayed(keep_alive)
            return
        t.write(s.events[i])
        wait_s = self._delay_s if i + 1 < s.tokens else 0.0
        asyncio.get_running_loop().call_later(wait_s, self._send_event, s, i + 1, keep_alive)

    def _send_later(self, body: bytes, keep_alive: bool) -> None:
        if self._transport is not None:
            self._transport.write(body)
            self._done_delayed(keep_alive)

    def _done_delayed(self, keep_alive: bool) -> None:
        self._busy = False
        if self._transport is not None:
            self._transport.resume_reading()
        self._finish(keep_alive)
        if self._queue and self._transport is not None:
            self._send(*self._queue.popleft())

    def _finish(self, keep_alive: bool) -> None:
        if not keep_alive and self._transport is not None:
            self._transport.close()


async def serve(
    host: str, port: int, tokens: int, token_delay_ms: float, embeddings_bytes: int = 0
) -> None:
    responses = build_responses(tokens, int(time.time()))
    if embeddings_bytes > 0:
        responses = dataclasses.replace(responses, embeddings=embeddings_answer(embeddings_bytes))
    delay_s = token_delay_ms / 1000.0
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: FakeBackendProtocol(responses, tokens, delay_s), host, port, backlog=2048
    )
    print(
        f"fake backend on http://{host}:{port} ({tokens} tokens, {token_delay_ms} ms/token, "
        f"loop={type(loop).__module__})",
        file=sys.stderr,
        flush=True,
    )
    async with server:
        await server.serve_forever()


def _runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--tokens", type=int, default=16, help="completion tokens per answer")
    p.add_argument(
        "--token-delay-ms",
        type=float,
        default=0.0,
        help="time per generated token (streamed: between events)",
    )
    p.add_argument(
        "--embeddings-bytes",
        type=int,
        default=0,
        help="answer POST /v1/embeddings with a list of about this many bytes (0: 404)",
    )
    a = p.parse_args(argv)
    if a.tokens < 1:
        p.error("--tokens must be >= 1")
    try:
        with _runner() as runner:
            runner.run(serve(a.host, a.port, a.tokens, a.token_delay_ms, a.embeddings_bytes))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
