"""`energy-proxy demo` as a user runs it: the table, `--backend URL`, and the cleanup on
Ctrl-C, SIGTERM and SIGHUP."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from backends.local.launch import BUNDLED_MODEL_FILE, llama_cpp_python_server
from tests.support.marked import alive_with, marked_env

pytestmark = pytest.mark.e2e

DEMO = [sys.executable, "-m", "proxy.cli", "demo"]
# No COLUMNS: through a pipe, as in a CI log, the demo's table must come out whole.
ENV = {**{k: v for k, v in os.environ.items() if k != "COLUMNS"}, "NO_COLOR": "1"}


def read_until(proc: subprocess.Popen[str], marker: str, timeout_s: float) -> str:
    """What the demo printed up to the line holding `marker` (which it must print)."""
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout_s
    while marker not in seen and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
    assert marker in seen, seen
    return seen


def test_demo_prints_a_row_per_prompt_and_stops_its_servers() -> None:
    env, mark = marked_env(ENV)
    done = subprocess.run(DEMO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for category in ("code", "sql", "math", "translation", "summarization", "questions"):
        assert f"│ {category}" in out
    assert "cpu-estimate" in out and "ESTIMATE" in out
    header = next(line for line in out.splitlines() if "category" in line and "joules" in line)
    for column in ("tokens in/out", "J/token", "gCO2eq", "seconds"):
        assert column in header, out  # whole, not cut to fit 80 columns
    assert "…" not in out
    assert alive_with(mark) == []


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


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_both_servers(tmp_path: Path, signum: signal.Signals) -> None:
    env, mark = marked_env(ENV)
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.Popen(
        DEMO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    seen = read_until(proc, "Starting energy-proxy", 300)
    servers = [c for c in alive_with(mark) if BUNDLED_MODEL_FILE in c]
    assert servers, "the bundled backend should be running under the demo"
    proc.send_signal(signum)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode in (128 + signum, 1), seen + rest
    assert alive_with(mark) == []
    if proc.returncode != 1:  # stopped, not failed: nothing is left in the temp folder
        assert list(tmp_path.glob("energy-proxy-demo-*")) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_keep_serves_the_live_page_until_stopped(tmp_path: Path, signum: signal.Signals) -> None:
    """`--keep` serves until Ctrl-C, or the SIGTERM of a script, systemd or `docker stop`,
    or the SIGHUP of a closed terminal: each stops both servers and removes its folder."""
    env, mark = marked_env(ENV)
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.Popen(
        [*DEMO, "--keep", "--max-tokens", "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    seen = read_until(proc, "to stop.", 600)
    page = re.search(r"live page: (http://127\.0\.0\.1:\d+/)", seen)
    assert page, seen
    assert len(list(tmp_path.glob("energy-proxy-demo-*"))) == 1  # named in that line
    # The prompts are done; the page and the API still answer.
    r = httpx.get(page.group(1), timeout=10)
    assert r.status_code == 200 and "<title>energy-proxy</title>" in r.text
    with httpx.stream("GET", page.group(1) + "v1/energy/events", timeout=10) as events:
        hello = next(line for line in events.iter_lines() if line.startswith("data:"))
    assert len(json.loads(hello[5:])["requests"]) == 6  # every demo prompt, as it finished
    proc.send_signal(signum)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, seen + rest
    assert "stopped" in rest
    assert alive_with(mark) == []
    assert list(tmp_path.glob("energy-proxy-demo-*")) == []
