"""uvicorn's server, ending the live page's event streams as it starts shutting down."""

from __future__ import annotations

import socket
from collections.abc import Callable

import uvicorn


class ProxyServer(uvicorn.Server):
    """Live-event streams never finish by themselves: left open, they would hold the
    graceful shutdown for its whole timeout (30 s) before the requests in flight are seen
    to. `on_shutdown` ends them first."""

    def __init__(self, config: uvicorn.Config, *, on_shutdown: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_shutdown = on_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._on_shutdown()
        await super().shutdown(sockets)
