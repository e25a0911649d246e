"""Connections that never finish their head, against a real `energy-proxy serve` (uvicorn
with the guarded httptools protocol) on real sockets: a header line without end is
answered 431 and closed, a head that does not arrive 408, connections past the cap 503,
and the proxy goes on serving meanwhile."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from backends.local.launch import free_port
from proxy.http_guard import HEAD_LIMIT_BYTES, RESERVED_FILES, connection_cap
from tests.support.polling import wait_for


@contextmanager
def _serve(
    fake_server: str, tmp_path: Path, *args: str, files: int | None = None
) -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "proxy.cli", "serve", "--backend", fake_server,
            "--port", str(port), "--power-source", "constant:50",
            "--db", str(tmp_path / "r.db"), *args]  # fmt: skip

    def limit_files() -> None:
        if files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit_files)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        else:
            pytest.fail((tmp_path / "serve.log").read_text())
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def serve(fake_server: str, tmp_path: Path) -> Iterator[str]:
    with _serve(fake_server, tmp_path, "--header-timeout", "1") as url:
        yield url


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    return s


def _answer(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_a_header_line_without_end_is_431_and_closed(serve: str) -> None:
    with _connect(serve) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: ")
        sent = 0
        while sent < 16 * HEAD_LIMIT_BYTES:  # far past the limit, never a line end
            try:
                s.sendall(b"a" * 8192)
            except BrokenPipeError:
                break  # the server has closed: what is asked
            sent += 8192
        answer = _answer(s)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"headers_too_large" in answer
    assert httpx.get(serve + "/healthz").status_code == 200


def test_a_head_that_does_not_arrive_is_408_and_closed(serve: str) -> None:
    with _connect(serve) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")  # and nothing more
        answer = _answer(s)  # the server closes it (--header-timeout 1)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    with _connect(serve) as silent:  # sends nothing at all: closed without an answer
        assert _answer(silent) == b""
    # A whole request is not cut by it, however long it then takes.
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(serve + "/v1/chat/completions", headers={"x-fake-delay-s": "1.5"}, json=chat)
    assert r.status_code == 200


def test_connections_past_the_cap_get_503_and_the_proxy_stays_up(
    fake_server: str, tmp_path: Path
) -> None:
    files = 256
    cap = connection_cap(files)
    assert cap == (files - RESERVED_FILES) // 2
    with _serve(fake_server, tmp_path, files=files) as url:
        held = [_connect(url) for _ in range(cap + 20)]
        refused = 0
        for s in held[cap:]:
            s.settimeout(10)
            answer = _answer(s)
            refused += answer.startswith(b"HTTP/1.1 503 ")
        assert refused >= 15  # the ones past the cap (a few may race the server's count)
        for s in held:
            s.close()

        health = url + "/healthz"
        # Once the server has seen the closes: the files were never exhausted.
        assert wait_for(lambda: httpx.get(health).status_code == 200)


def test_pipelined_requests_with_large_bodies_are_not_taken_for_a_long_head(serve: str) -> None:
    """One read can end a request's large body and begin the next request's head: that
    read is not counted as head, and both requests are answered."""
    body = json.dumps(
        {"model": "fake-model", "messages": [{"role": "user", "content": "x" * 200_000}]}
    ).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % len(body)
    )
    second = b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    with _connect(serve) as s:
        s.sendall(head + body + second[:20])  # the next head begins in the same write
        s.sendall(second[20:])
        answer = _answer(s)
    assert answer.count(b"HTTP/1.1 200 ") == 2, answer[:300]
    assert b" 431 " not in answer


def test_a_chunked_bodys_trailer_without_end_is_cut_off(serve: str) -> None:
    """A chunked body's trailer lines are gathered by the parser as headers are: bounded
    the same way (the connection is closed past the limit), not 128 MB of parser work."""
    with _connect(serve) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
            b"\r\ntransfer-encoding: chunked\r\n\r\n0\r\nx-trailer: "
        )
        sent = 0
        while sent < 32 * HEAD_LIMIT_BYTES:
            try:
                s.sendall(b"a" * 8192)
            except (BrokenPipeError, ConnectionResetError):
                break  # closed by the server: what is asked
            sent += 8192
        with contextlib.suppress(ConnectionResetError):
            _answer(s)  # returns: the server closed it (before, it waited for ever)
    assert httpx.get(serve + "/healthz").status_code == 200


def test_a_bare_line_end_after_an_answer_does_not_hold_the_connection(serve: str) -> None:
    """Keep-alive: after an answer, a CRLF (which the parser skips, beginning no request)
    and silence: the connection is still closed by the head timer."""
    with _connect(serve) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        s.sendall(b"\r\n")
        rest = _answer(s)  # closed (--header-timeout 1); it would hang before
    assert b"HTTP/1.1 408 " in first + rest, (first + rest)[:300]
