"""The backend's failures in the user's terms, against real sockets: a refused port, a
name that does not resolve, an answer broken off mid-stream."""

from __future__ import annotations

import asyncio
import socket

import pytest

from proxy.errors import BackendUnreachable
from proxy.relay.upstream import AiohttpUpstream


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _send(url: str) -> str:
    upstream = AiohttpUpstream(timeout_s=5.0)
    await upstream.start()
    try:
        with pytest.raises(BackendUnreachable) as raised:
            await upstream.send("POST", url, [], b"{}")
        return raised.value.message
    finally:
        await upstream.aclose()


def test_a_refused_connection_names_the_url_as_written() -> None:
    port = _closed_port()
    message = asyncio.run(_send(f"http://127.0.0.1:{port}/v1/chat/completions"))
    assert message == f"cannot reach the backend at http://127.0.0.1:{port}: connection refused"
    assert "ssl" not in message


async def _broken_answer(port_ready: asyncio.Future[int]) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 30)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port_ready.set_result(server.sockets[0].getsockname()[1])
    async with server:
        await asyncio.sleep(3)


async def _read_broken() -> str:
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(_broken_answer(ready))
    port = await ready
    upstream = AiohttpUpstream(timeout_s=5.0)
    await upstream.start()
    try:
        resp = await upstream.send("GET", f"http://127.0.0.1:{port}/", [], b"")
        try:
            with pytest.raises(BackendUnreachable) as raised:
                while await resp.next_chunk():
                    pass
        finally:
            await resp.close()
        return raised.value.message
    finally:
        await upstream.aclose()
        serving.cancel()


def test_an_answer_broken_off_says_how_much_had_come() -> None:
    message = asyncio.run(_read_broken())
    assert message == (
        "the backend closed the connection after 30 bytes of its answer; "
        "the answer was not complete"
    )


def test_a_url_that_does_not_parse_is_named_as_written() -> None:
    message = asyncio.run(_send("http://127.0.0.1:99999/v1/chat/completions"))
    assert "http://127.0.0.1:99999/v1/chat/completions" in message
