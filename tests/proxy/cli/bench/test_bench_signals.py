"""`energy-proxy bench --backend URL` stopped by SIGTERM (a script's kill, systemd, a CI
job's timeout) or SIGHUP, as by Ctrl-C: the proxy it started is stopped, exit 130."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.support.polling import wait_for


def _alive_with(mark: str) -> list[str]:
    """Live processes whose environment holds `mark` (the bench and what it started)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            if mark.encode() in environ and (proc / "stat").read_text().split()[2] != "Z":
                found.append(proc.name)
        except OSError:
            continue
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_stops_bench_and_the_proxy_it_started(
    fake_server: str, tmp_path: Path, signum: signal.Signals
) -> None:
    value = uuid.uuid4().hex
    mark = f"ENERGY_PROXY_TEST_MARK={value}"
    out = tmp_path / "out"
    env = {**os.environ, "ENERGY_PROXY_TEST_MARK": value, "NO_COLOR": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "bench", "--backend", fake_server,
         "--power-source", "constant:50", "--idle-s", "60", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        # The proxy it started is up once its log says so (then the bench measures idle).
        log = out / "proxy.log"
        assert wait_for(lambda: log.exists() and "Uvicorn running" in log.read_text(), 60)
        assert len(_alive_with(mark)) >= 2  # the bench and its proxy
        proc.send_signal(signum)
        printed, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, printed
    assert wait_for(lambda: _alive_with(mark) == [], 10), printed
