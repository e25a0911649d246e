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
        assert s.rest() == b"" and not s.unparsed


def test_a_line_that_never_ends_is_given_up_past_the_limit() -> None:
    s = SseSplitter()
    s.feed(b'data: {"ok": 1}\n\n')
    piece = b"x" * 65536
    fed = 0
    while not s.unparsed:
        assert s.feed(piece) == []
        fed += len(piece)
        assert fed <= MAX_EVENT_BYTES + len(piece)
    assert s.overflow == b"x" * fed  # handed back whole, to be relayed as it came


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
    assert b"\"content\": \"" + b"y" * (96 * 65536) + b"\"}}]}\n\n" in body  # every byte sent
    last = [ln for ln in body.split(b"\n") if ln.startswith(b"data: {")][-1]
    energy = json.loads(last[6:])["energy"]
    assert energy["joules"] > 0
