"""The bundled backend started alone, as the README says: `python -m backends.local.bundled
serve --port P` serves the bundled model's OpenAI API until SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from backends.local.launch import BUNDLED_MODEL_ALIAS, free_port

pytestmark = pytest.mark.e2e


def test_serve_answers_on_its_port_until_sigterm(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "backend.log"
    with log.open("w") as out:  # a file, not a pipe: the server logs plenty while loading
        proc = subprocess.Popen(
            [sys.executable, "-m", "backends.local.bundled", "serve", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        models: list[str] = []
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                doc = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
                models = [m["id"] for m in doc["data"]]
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert models == [BUNDLED_MODEL_ALIAS], log.read_text()
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": BUNDLED_MODEL_ALIAS, "max_tokens": 2,
                  "messages": [{"role": "user", "content": "hi"}]},
            timeout=60,
        )  # fmt: skip
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert f"serving {BUNDLED_MODEL_ALIAS} at http://127.0.0.1:{port}/v1" in log.read_text()
