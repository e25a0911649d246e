"""A backend that dies while the proxy routes to it: the proxy says so once in its log and
in /readyz, and comes back ready when the backend does; the demo names the signal that
killed the backend it started, with its log, instead of printing a table of 502s."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from backends.local.launch import free_port
from tests.conftest import serve_proxy
from tests.proxy.relay.test_sockets import CHAT, wait_for
from tests.support.fakes.llama_cpp import install_fake
from tests.support.fakes.openai_backend import make_fake_backend
from tests.support.servers import ServerThread

NOT_READY = "not ready"


def readyz_backend(proxy_url: str) -> dict[str, object]:
    (b,) = httpx.get(f"{proxy_url}/readyz").json()["backends"]
    assert isinstance(b, dict)
    return b


def test_a_backend_that_stops_answering_is_unready_once_then_ready_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="energy_proxy.backends")
    port = free_port()
    app, _ = make_fake_backend()
    backend = ServerThread(app, port=port)
    backend_url = backend.__enter__()
    with serve_proxy(tmp_path, backend_url) as proxy:
        assert httpx.post(f"{proxy}/v1/chat/completions", json=CHAT).status_code == 200
        assert httpx.get(f"{proxy}/readyz").status_code == 200
        backend.__exit__(None, None, None)  # the backend goes away

        for _ in range(5):
            r = httpx.post(f"{proxy}/v1/chat/completions", json=CHAT)
            assert r.status_code == 502
            assert r.json()["error"]["code"] == "backend_unreachable"
        ready = httpx.get(f"{proxy}/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        b = readyz_backend(proxy)
        assert b["ready"] is False and b["url"] == backend_url
        assert "cannot reach the backend" in str(b["error"]) or "failed" in str(b["error"])
        downs = [r for r in caplog.records if NOT_READY in r.getMessage()]
        assert len(downs) == 1, [r.getMessage() for r in caplog.records]
        assert backend_url in downs[0].getMessage()

        # Back on the same port: the proxy's faster recheck while down finds it.
        app2, _ = make_fake_backend()
        with ServerThread(app2, port=port):
            assert wait_for(lambda: httpx.get(f"{proxy}/readyz").status_code == 200, 15.0)
            assert readyz_backend(proxy)["ready"] is True and "error" not in readyz_backend(proxy)
            assert httpx.post(f"{proxy}/v1/chat/completions", json=CHAT).status_code == 200
        agains = [r for r in caplog.records if "ready again" in r.getMessage()]
        assert len(agains) == 1
        assert len([r for r in caplog.records if NOT_READY in r.getMessage()]) == 1


# --- the demo -----------------------------------------------------------------------------


def run_demo(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    """`energy-proxy demo` with the fake llama_cpp on PYTHONPATH, behaving as `mode`."""
    root = install_fake(tmp_path / "fake")
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "FAKE_LLAMA_MODE": mode,
        "COLUMNS": "200",
        "NO_COLOR": "1",
        "TMPDIR": str(tmp_path),  # a failed demo keeps its logs' folder: here, not in /tmp
    }
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "demo", "--power-source", "constant:50"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )


def test_demo_names_the_signal_of_a_backend_that_dies_mid_run(tmp_path: Path) -> None:
    done = run_demo(tmp_path, "sigill-on-generate")
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert (
        "energy-proxy demo: the backend exited with SIGILL (illegal instruction), exit code -4"
        in out
    )
    assert "./scripts/setup.sh --rebuild-backend" in out
    log = re.search(r"its log: (\S+backend\.log)\)", out)
    assert log is not None and Path(log.group(1)).is_file()
    # A failed demo keeps its folder for the logs (in $TMPDIR) and names it.
    assert Path(log.group(1)).parent.parent == tmp_path
    assert f"logs in {Path(log.group(1)).parent}" in out
    # What the proxy itself says, quoted: the backend it routes to is not ready.
    assert re.search(r"/readyz: backend default \(http://127\.0\.0\.1:\d+\) not ready: ", out)
    # Not a table of 502s: it stopped at the first failure.
    assert "502" not in out and "every prompt failed" not in out
    assert "Energy per prompt" not in out


def test_demo_names_the_signal_of_a_backend_that_dies_while_starting(tmp_path: Path) -> None:
    done = run_demo(tmp_path, "sigill-on-import")
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert "the backend exited with SIGILL (illegal instruction), exit code -4" in out
    assert "backend.log" in out


def test_demo_with_a_backend_that_works_prints_the_table(tmp_path: Path) -> None:
    done = run_demo(tmp_path, "ok")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Energy per prompt" in done.stdout
    for category in ("code", "sql", "math"):
        assert f"│ {category}" in done.stdout
    assert list(tmp_path.glob("energy-proxy-demo-*")) == []  # it ended well: removed
