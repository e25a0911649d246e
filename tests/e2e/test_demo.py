"""`energy-proxy demo` as a user runs it: the table, `--backend URL`, and Ctrl-C cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backends.launch import BUNDLED_MODEL_FILE, llama_cpp_python_server

pytestmark = pytest.mark.e2e

DEMO = [sys.executable, "-m", "proxy.cli", "demo"]
ENV = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}


def children_alive(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (ours: servers we started)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if marker in ln and "ps -eo" not in ln]


def test_demo_prints_a_row_per_prompt_and_stops_its_servers() -> None:
    before = children_alive(BUNDLED_MODEL_FILE)
    done = subprocess.run(DEMO, capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for category in ("code", "sql", "math", "translation", "summarization", "questions"):
        assert f"│ {category}" in out
    assert "cpu-estimate" in out and "ESTIMATE" in out
    assert children_alive(BUNDLED_MODEL_FILE) == before


def test_demo_against_a_running_backend(tmp_path: Path) -> None:
    with llama_cpp_python_server(log_path=tmp_path / "b.log") as backend:
        done = subprocess.run(
            [*DEMO, "--backend", backend.url, "--max-tokens", "8"],
            capture_output=True,
            text=True,
            timeout=600,
            env=ENV,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Starting the bundled CPU backend" not in done.stdout
        assert "│ questions" in done.stdout


def test_ctrl_c_stops_both_servers(tmp_path: Path) -> None:
    before = children_alive(BUNDLED_MODEL_FILE)
    proc = subprocess.Popen(
        DEMO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV
    )
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + 300
    while "Starting energy-proxy" not in seen and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
    assert "Starting energy-proxy" in seen, seen
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode in (130, 1), seen + rest
    assert children_alive(BUNDLED_MODEL_FILE) == before
    assert children_alive("proxy.cli serve") == []
