"""One JSON line per finished request, written in batches off the request path.

The `logging` module costs several microseconds per record (record object, handler lock,
a write per line); at thousands of requests per second that showed in bench/overhead.py.
Lines are queued as bytes and written together every `period_s` (and at shutdown).
Never holds prompt or completion text: the caller passes only ids, numbers and labels.
"""

from __future__ import annotations

import asyncio
import sys
from typing import IO, Any

import orjson


class RequestLog:
    def __init__(self, stream: IO[bytes] | None = None, *, max_pending: int = 2048) -> None:
        self._stream = stream if stream is not None else sys.stderr.buffer
        self._pending: list[bytes] = []
        self._max_pending = max_pending
        self.enabled = True
        self.dropped_lines = 0

    def write(self, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._pending.append(orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE))
        if len(self._pending) >= self._max_pending:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        try:
            self._stream.write(b"".join(lines))
            self._stream.flush()
        except (OSError, ValueError):
            # A closed or broken log stream must not fail requests; count what is lost.
            self.dropped_lines += len(lines)

    async def run(self, period_s: float = 0.25) -> None:
        while True:
            await asyncio.sleep(period_s)
            self.flush()
