"""How `energy-proxy serve` ends: Ctrl-C and SIGTERM with a live page open end it at once
with no traceback; a port that is taken exits 3 (as uvicorn.run does)."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import httpx
import pytest

from backends.local.launch import LaunchError, proxy_server


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_serve_cleanly_with_a_page_open(
    fake_server: str, tmp_path: Path, signum: int
) -> None:
    log = tmp_path / "proxy.log"
    server = proxy_server(
        fake_server,
        extra_args=["--power-source", "constant:50", "--db", str(tmp_path / "r.db")],
        log_path=log,
    )
    with server, httpx.stream("GET", server.url + "/v1/energy/events", timeout=30) as events:
        lines = events.iter_lines()
        assert next(lines).startswith("retry:")  # a page is connected
        assert server.proc is not None
        server.proc.send_signal(signum)
        # The open stream is ended by the server (not left to the 30 s graceful timeout):
        # the rest of it reads to its end.
        rest = list(lines)
        # Ctrl-C: exit 0. SIGTERM: uvicorn raises it again once shut down, so the parent
        # (systemd, kubelet) sees the signal it sent, as with any well-behaved server.
        assert server.proc.wait(timeout=20) == (0 if signum == signal.SIGINT else -signum)
    text = log.read_text()
    assert "Traceback" not in text and "graceful shutdown exceeded" not in text, text
    assert any(line.startswith("data:") for line in rest)  # the hello, then the end


def test_a_taken_port_exits_3(fake_server: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = proxy_server(
            fake_server,
            port=port,
            extra_args=["--power-source", "constant:50", "--db", str(tmp_path / "r.db")],
        )
        with pytest.raises(LaunchError, match="exit code 3"):
            server.start()
