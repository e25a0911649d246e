"""Run an ASGI app on a real 127.0.0.1 socket in a background thread, for a test's lifetime."""

from __future__ import annotations

import asyncio
import threading
import time
from types import TracebackType
from typing import Any, Literal

import uvicorn

from proxy.server import ProxyServer


class ServerThread:
    """`with ServerThread(app) as url:` serves `app` under uvicorn on a free port (or on
    `port`, to bring a server back where it was)."""

    def __init__(
        self,
        app: Any,
        *,
        lifespan: Literal["auto", "on", "off"] = "on",
        http: Literal["auto", "h11", "httptools"] = "httptools",
        port: int = 0,
    ) -> None:
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            lifespan=lifespan,
            log_level="warning",
            access_log=False,
            http=http,
            loop="asyncio",
            timeout_graceful_shutdown=5,
        )
        # The proxy's own server class ends its live-event streams as shutdown begins
        # (an open stream would otherwise hold it for the graceful timeout).
        close_streams = getattr(app, "close_live_streams", None)
        self.server = (
            ProxyServer(config, on_shutdown=close_streams)
            if close_streams is not None
            else uvicorn.Server(config)
        )
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.url = ""
        self.loop: asyncio.AbstractEventLoop | None = None

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve())
        self.loop.close()

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=20)
