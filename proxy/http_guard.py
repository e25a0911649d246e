"""uvicorn's httptools protocol with the limits a server in front of the internet needs
before a request's head is complete: the parser itself has none.

httptools (llhttp) takes a header line of any length, and uvicorn accumulates what it
hands over: one unauthenticated connection sending a 100 MB header line cost 11.9 s of
CPU and 144 MB, and stalled every other request meanwhile (vLLM met the same:
GHSA-rxc4-3w6r-4v47). A connection that never finishes its head held its file for ever,
and a thousand of them took the process down at the usual limit of 1,024 files. So:

- HEAD_LIMIT_BYTES: the bytes a connection may send while its head is not complete
  (request line and headers; the app's own limit on complete headers is 32 KiB), counted
  over the reads that begin and end inside the unfinished head: past it, 431 and closed;
- HEAD_TIMEOUT_S: the seconds from a connection's start (or a request's first byte) to
  its head complete: past it, 408 and closed;
- `max_connections`: connections open at once; one more is answered 503 and closed at
  once, before the process runs out of files (`connection_cap` sets it from the file
  limit).

The limits act only where the head is unfinished: a request's cost once its head is
complete is the parser's own (bench/overhead.py).
"""

from __future__ import annotations

import asyncio
import resource
from typing import Any, ClassVar

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEAD_LIMIT_BYTES = 64 * 1024
HEAD_TIMEOUT_S = 30.0
# After a refusal the connection is half-closed and what the client still sends is read
# and dropped for this long before it is closed: closed at once, the client's unread data
# would make the system reset the connection, and the client lose the answer with it.
LINGER_S = 2.0
# Files kept for the rest of the process (sensors, the store, backends' connections, logs).
RESERVED_FILES = 64

_REASONS = {
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


def connection_cap(soft_files: int) -> int:
    """Connections to allow at once under a limit of `soft_files` open files: what is left
    after RESERVED_FILES, and each connection to a client may need one to a backend."""
    return max(16, (soft_files - RESERVED_FILES) // 2)


def raise_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (as servers do);
    the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # kept as it was: the cap below follows what is in force
    return soft


def refusal(status: int, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, the error in OpenAI's shape."""
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error",
                                   "code": code}})  # fmt: skip
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body))
    ) + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with a bound on an unfinished head's bytes and time, and on the
    connections open at once."""

    max_connections: ClassVar[int | None] = None
    head_timeout_s: ClassVar[float] = HEAD_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._awaiting_head = True
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False  # answered and half-closed: what comes is dropped
        # Past the head: reads that brought no body (a chunked body's trailer lines, which
        # the parser gathers as it does headers) are bounded as a head is.
        self._progress = False
        self._stalled_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        cap = self.max_connections
        if cap is not None and len(self.connections) > cap:
            self._refuse(503, "too many connections to this proxy; retry shortly", "overloaded")
            return
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        # Counted only when the read began inside an unfinished head: a read that ends one
        # request's body and begins the next one's head (pipelining) is not all head.
        in_head = self._awaiting_head
        self._progress = False
        super().data_received(data)
        if self.transport.is_closing():
            return
        if in_head and self._awaiting_head:
            self._head_bytes += len(data)
            if self._head_bytes > HEAD_LIMIT_BYTES:
                self._refuse(
                    431,
                    f"the request line and headers are over {HEAD_LIMIT_BYTES} bytes",
                    "headers_too_large",
                )
        elif not self._awaiting_head and self.cycle is not None and self.cycle.more_body:
            self._stalled_bytes = 0 if self._progress else self._stalled_bytes + len(data)
            if self._stalled_bytes > HEAD_LIMIT_BYTES:
                self._refuse(
                    431,
                    f"the request's trailer lines are over {HEAD_LIMIT_BYTES} bytes",
                    "headers_too_large",
                )

    def on_body(self, body: bytes) -> None:
        self._progress = True
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._progress = True
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Waiting for the next request's head now (keep-alive): bytes that begin none (a
        # bare CRLF, which the parser skips) must not hold the connection past the timer.
        request_done = self.cycle is None or not self.cycle.more_body
        if request_done and not self.pipeline and not self.transport.is_closing():
            self._awaiting_head = True
            self._head_bytes = 0
            if self._head_timer is None:
                self._start_head_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._awaiting_head = True
        if self._head_timer is None:
            self._start_head_timer()

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._stalled_bytes = 0
        self._stop_head_timer()
        super().on_headers_complete()

    def _start_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        # Only a connection with no request under way: one between requests is uvicorn's
        # keep-alive timeout's, and a response in progress is not cut.
        idle = self.cycle is None or self.cycle.response_complete
        if not self._awaiting_head or self.transport.is_closing() or not idle:
            return
        if self._head_bytes == 0:
            self.transport.close()  # nothing sent at all: closed without an answer
            return
        self._refuse(
            408,
            f"the request's headers did not arrive within {self.head_timeout_s:g} s",
            "request_timeout",
        )

    def _refuse(self, status: int, message: str, code: str) -> None:
        self._awaiting_head = False
        self._refused = True
        self._stop_head_timer()
        transport = self.transport
        if transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            transport.close()  # an answer is under way: no second one written into it
            return
        transport.write(refusal(status, message, code))
        if transport.can_write_eof():
            transport.write_eof()  # the answer, then our end closed; theirs read and dropped
            self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()


def guarded_protocol(
    max_connections: int | None, head_timeout_s: float = HEAD_TIMEOUT_S
) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for uvicorn's `http`, with its connection cap and head timeout."""
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {"max_connections": max_connections, "head_timeout_s": head_timeout_s},
    )
