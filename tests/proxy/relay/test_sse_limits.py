"""The SSE splitter on hostile streams: events cut anywhere across chunks, a line that never
ends (bounded: past MAX_EVENT_BYTES the stream is relayed unparsed, the energy still sent)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from proxy.relay.sse import MAX_EVENT_BYTES, SseSplitter
from tests.conftest import serve_proxy
from tests.support.servers import ServerThread


def test_events_cut_anywhere_come_out_whole() -> None:
    stream = b'data: {"a": 1}\r\n\r\ndata: {"b": 2}\n\ndata: {"c": 3}\r\n\r\n'
    for size in (1, 2, 3, 5, 7, 64):
        s = SseSplitter()
        events = []
        for i in range(0, len(stream), size):
            events += s.feed(stream[i : i + size])
        assert events == [
            b'data: {"a": 1}\r\n\r\n',
            b'data: {"b": 2}\n\n',
            b'data: {"c": 3}\r\n\r\n',
        ]
        assert s.rest() == b"" and not s.raw


def _relayed(pieces: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(p) for p in pieces)


def test_an_event_past_the_limit_is_relayed_as_it_comes_then_splitting_goes_on() -> None:
    s = SseSplitter()
    assert s.feed(b'data: {"ok": 1}\n\n') == [b'data: {"ok": 1}\n\n']
    piece = b"x" * 65536
    out: list[bytes | memoryview] = []
    fed = 0
    while not s.raw:
        out += s.feed(piece)
        fed += len(piece)
        assert fed <= MAX_EVENT_BYTES + len(piece)
    s.raw = False
    out += s.feed(piece)  # still inside it: relayed as it comes, nothing held
    assert s.raw and all(isinstance(p, memoryview) for p in out)
    s.raw = False
    # Its end, then events parsed again (the energy and [DONE] come after it as usual).
    rest = s.feed(b"yy\n\ndata: {\"b\": 2}\n\ndata: [DONE]\n\n")
    assert s.raw and isinstance(rest[0], memoryview) and bytes(rest[0]) == b"yy\n\n"
    assert rest[1:] == [b'data: {"b": 2}\n\n', b"data: [DONE]\n\n"]
    assert _relayed(out) + bytes(rest[0]) == b"x" * (fed + len(piece)) + b"yy\n\n"


def test_an_event_and_an_oversized_one_in_a_single_chunk() -> None:
    s = SseSplitter()
    big = b"data: " + b"x" * (MAX_EVENT_BYTES + 10)
    first = s.feed(b"data: a\n\n" + big)
    assert s.raw and first[0] == b"data: a\n\n" and bytes(first[1]) == big
    s.raw = False
    after = s.feed(b"yyy\n\ndata: b\n\n")
    assert bytes(after[0]) == b"yyy\n\n" and after[1:] == [b"data: b\n\n"]


def test_byte_by_byte_the_events_come_out_whole() -> None:
    event = b"data: " + b"z" * 5000 + b"\r\n\r\n"
    s = SseSplitter()
    out = []
    for i in range(len(event) * 2):
        out += s.feed((event * 2)[i : i + 1])
    assert out == [event, event] and not s.raw


async def _endless(_: Request) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        yield b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
        yield b'data: {"choices": [{"index": 0, "delta": {"content": "'
        for _ in range(96):  # 6 MiB of one event, never ended
            yield b"y" * 65536
        yield b'"}}]}\n\ndata: [DONE]\n\n'

    return StreamingResponse(body(), media_type="text/event-stream")


def test_an_oversized_event_is_relayed_whole_and_the_energy_follows(tmp_path: Path) -> None:
    app = Starlette(routes=[Route("/v1/chat/completions", _endless, methods=["POST"])])
    with ServerThread(app) as backend, serve_proxy(tmp_path, backend) as proxy:
        r = httpx.post(
            f"{proxy}/v1/chat/completions",
            json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]},
            timeout=60,
        )
    assert r.status_code == 200
    body = r.content
    # The stream goes on being read after the oversized event: energy, then [DONE].
    assert body.endswith(b"data: [DONE]\n\n")
    assert b"\"content\": \"" + b"y" * (96 * 65536) + b"\"}}]}\n\n" in body  # every byte sent
    last = [ln for ln in body.split(b"\n") if ln.startswith(b"data: {")][-1]
    energy = json.loads(last[6:])["energy"]
    assert energy["joules"] > 0
