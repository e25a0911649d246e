"""What `energy-proxy serve` says, as a user sees it in its log: one line at start naming
every figure in use (and whether the joules are measured or estimated), then one JSON line
per finished request unless `--no-request-log`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from backends.local.launch import proxy_server

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}


def _lines_when(log: Path, ready: str, timeout_s: float = 10.0) -> list[str]:
    """The log's lines once one holds `ready` (the server writes them in batches)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines()
        if any(ready in line for line in lines):
            return lines
        time.sleep(0.05)
    raise AssertionError(f"no line with {ready!r} in:\n{log.read_text()}")


@pytest.mark.parametrize("request_log", [True, False])
def test_serve_names_its_figures_and_logs_each_request(
    fake_server: str, tmp_path: Path, request_log: bool
) -> None:
    log, db = tmp_path / "proxy.log", tmp_path / "r.db"
    args = ["--power-source", "cpu-estimate", "--db", str(db), "--carbon-intensity", "300"]
    if not request_log:
        args.append("--no-request-log")
    with proxy_server(fake_server, extra_args=args, log_path=log) as server:
        said = log.read_text()
        assert "schema migrated" not in said  # a new store is one line, not one per step
        assert said.count(f"request store {db}: created") == 1
        start = next(ln for ln in said.splitlines() if ln.startswith("energy-proxy:"))
        assert "cpu-estimate" in start and "ESTIMATE" in start  # not passed off as measured
        assert "carbon intensity 300 gCO2eq/kWh, static" in start
        assert "embodied none:" in start  # a host with no measured GPU gets no GPU figure
        assert f"store {db}" in start and "keys off" in start and "attribution model" in start
        assert f"request log {'on' if request_log else 'off'}" in start
        r = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 3})
        assert r.status_code == 200
        rid = r.headers["x-energy-request-id"]
        if request_log:  # written in batches, a moment after the answer
            _lines_when(log, rid)
    # Stopped: whatever the server had to write (its request log is flushed at shutdown).
    entries = [json.loads(ln) for ln in log.read_text().splitlines() if ln.startswith("{")]
    if not request_log:
        assert entries == []
        return
    (entry,) = entries
    assert entry["request_id"] == rid and entry["status"] == 200
    assert entry["model"] == "fake-model" and entry["backend"]
    assert entry["joules"] == pytest.approx(r.json()["energy"]["joules"], abs=1e-6)
    assert entry["completion_tokens"] == 3 and entry["prompt_tokens"] is not None
    assert "hello" not in json.dumps(entry)  # never the prompt
