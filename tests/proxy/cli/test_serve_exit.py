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


@pytest.mark.parametrize("stream", [False, True])
def test_sigkill_right_after_the_last_answer_loses_no_record(
    fake_server: str, tmp_path: Path, stream: bool
) -> None:
    """Every answered request is in the store after a SIGKILL and a restart: each record
    reached the journal before its energy was told (without it, 9 and 53 of these 120
    were lost)."""
    db = tmp_path / "r.db"
    args = ["--power-source", "constant:50", "--db", str(db)]
    server = proxy_server(fake_server, extra_args=args, log_path=tmp_path / "first.log")
    ids: list[str] = []
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        for i in range(120):
            body = {"model": "fake-model", "messages": [{"role": "user", "content": f"q{i}"}]}
            if stream:
                with client.stream("POST", "/v1/chat/completions",
                                   json={**body, "stream": True}) as resp:  # fmt: skip
                    assert resp.status_code == 200
                    text = "".join(resp.iter_text())
                    assert '"energy"' in text
                    ids.append(resp.headers["x-energy-request-id"])
            else:
                resp = client.post("/v1/chat/completions", json=body)
                assert resp.status_code == 200
                ids.append(resp.headers["x-energy-request-id"])
        assert server.proc is not None
        server.proc.kill()  # SIGKILL: no shutdown, no flush
        assert server.proc.wait(timeout=20) == -signal.SIGKILL
    again = proxy_server(fake_server, extra_args=args, log_path=tmp_path / "second.log")
    with again, httpx.Client(base_url=again.url, timeout=30) as client:
        missing = [i for i in ids if client.get(f"/v1/energy/requests/{i}").status_code != 200]
    assert missing == [], f"{len(missing)} of {len(ids)} answered requests lost"
    assert "from the journal" in (tmp_path / "second.log").read_text()
