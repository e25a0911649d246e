"""A multipart upload streamed to the backend as the client sends it, never held whole.

The head is read first, up to where the plain fields (`model`, `stream`) have gone by;
then the upstream client iterates the upload: the head, then each chunk as `receive()`
brings it. The body limit and the client timeout hold per chunk; a client that leaves
or sends too much ends the iteration with the reason kept in `problem`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from proxy.asgi import Receive
from proxy.errors import BodyTooLarge, ClientTooSlow, ProxyError
from proxy.relay.multipart import MAX_SCAN_BYTES, complete_fields


class UploadStopped(Exception):
    """The client's upload ended early (see `Upload.problem`)."""


class Upload:
    __slots__ = (
        "_head",
        "_limit",
        "_more",
        "_receive",
        "_size",
        "_timeout_s",
        "client_left",
        "finished",
        "length",
        "problem",
    )

    def __init__(self, receive: Receive, limit_bytes: int, timeout_s: float) -> None:
        self._receive = receive
        self._limit = limit_bytes
        self._timeout_s = timeout_s
        self._head = b""
        self._size = 0
        self._more = True
        self.length: bytes | None = None  # the client's content-length, passed on
        self.problem: ProxyError | None = None
        self.client_left = False
        # Set once the whole body was read (or the upload stopped): `receive` is free.
        self.finished = asyncio.Event()

    async def _next(self) -> bytes | None:
        """The next chunk of the body; None when the client left."""
        async with asyncio.timeout(self._timeout_s):
            msg = await self._receive()
        if msg["type"] == "http.disconnect":
            return None
        chunk: bytes = msg.get("body", b"")
        self._size += len(chunk)
        if self._size > self._limit:
            raise BodyTooLarge(f"request body is over the limit of {self._limit} bytes")
        self._more = bool(msg.get("more_body", False))
        return chunk

    async def read_fields(self, boundary: bytes) -> dict[str, str] | None:
        """The plain fields before the first file (all of them, if the body ends first);
        None when the client left. Raises TimeoutError, BodyTooLarge."""
        fields: dict[str, str] = {}
        while self._more and len(self._head) < MAX_SCAN_BYTES:
            chunk = await self._next()
            if chunk is None:
                self.finished.set()
                return None
            self._head += chunk
            fields, file_seen = complete_fields(self._head, boundary)
            if file_seen:
                break
        if not self._more:
            self.finished.set()
        return fields

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            if self._head:
                yield self._head
            while self._more:
                try:
                    chunk = await self._next()
                except TimeoutError:
                    self.problem = ClientTooSlow(f"the upload stalled for {self._timeout_s:g} s")
                    raise UploadStopped(self.problem.message) from None
                except BodyTooLarge as exc:
                    self.problem = exc
                    raise UploadStopped(exc.message) from None
                if chunk is None:
                    self.client_left = True
                    self.problem = ProxyError("the client left during its upload")
                    raise UploadStopped(self.problem.message)
                if chunk:
                    yield chunk
        finally:
            self.finished.set()
