"""`energy-proxy bench --backend URL` stopped by SIGTERM (a script's kill, systemd, a CI
job's timeout) or SIGHUP, as by Ctrl-C: the proxy it started is stopped, exit 130."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.marked import alive_with, marked_env
from tests.support.polling import wait_for


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_stops_bench_and_the_proxy_it_started(
    fake_server: str, tmp_path: Path, signum: signal.Signals
) -> None:
    env, mark = marked_env(NO_COLOR="1")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "bench", "--backend", fake_server,
         "--power-source", "constant:50", "--idle-s", "60", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        # The proxy it started is up once its log says so (then the bench measures idle).
        log = out / "proxy.log"
        assert wait_for(lambda: log.exists() and "Uvicorn running" in log.read_text(), 60)
        assert len(alive_with(mark)) >= 2  # the bench and its proxy
        proc.send_signal(signum)
        printed, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, printed
    assert wait_for(lambda: alive_with(mark) == [], 10), printed
