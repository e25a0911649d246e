"""The request store behind the HTTP API: restarts, summaries, SIGTERM under load, bad files."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from backends.local.launch import proxy_server
from metering.sources.constant import ConstantSource
from metering.store import RequestStore
from proxy.app import create_app
from proxy.relay.upstream import HttpxUpstream
from tests.conftest import proxy_settings
from tests.support.fakes.openai_backend import make_fake_backend

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "two words"}]}


async def run_requests(tmp_path: Path, n: int, **headers: str) -> list[httpx.Response]:
    backend_app, _ = make_fake_backend()
    app = create_app(
        proxy_settings(tmp_path),
        upstream=HttpxUpstream(30.0, transport=httpx.ASGITransport(app=backend_app)),
        sources=[ConstantSource(100.0, start_s=time.monotonic())],
    )
    async with (
        app.running(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as c,
    ):
        return [
            await c.post(
                "/v1/chat/completions", json={**CHAT, "max_tokens": 2 + i % 3}, headers=headers
            )
            for i in range(n)
        ]


async def read_back(tmp_path: Path, path: str) -> httpx.Response:
    backend_app, _ = make_fake_backend()
    app = create_app(
        proxy_settings(tmp_path),
        upstream=HttpxUpstream(30.0, transport=httpx.ASGITransport(app=backend_app)),
        sources=[ConstantSource(1.0, start_s=time.monotonic())],
    )
    async with (
        app.running(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as c,
    ):
        return await c.get(path)


async def test_records_survive_a_restart(tmp_path: Path) -> None:
    (r,) = await run_requests(tmp_path, 1)
    rid = r.headers["x-request-id"]
    after = await read_back(tmp_path, f"/v1/energy/requests/{rid}")  # a new process, same db
    assert after.status_code == 200
    assert after.json() == r.json()["energy"]


async def test_summary_means_per_model_and_category(tmp_path: Path) -> None:
    responses = await run_requests(tmp_path, 6, **{"x-prompt-category": "math"})
    responses += await run_requests(tmp_path, 2, **{"x-prompt-category": "code"})
    doc = (await read_back(tmp_path, "/v1/energy/summary")).json()
    rows = {(row["model"], row["category"]): row for row in doc["rows"]}
    math = rows[("fake-model", "math")]
    energies = [r.json()["energy"] for r in responses[:6]]
    assert math["count"] == 6
    assert math["mean_joules"] == pytest.approx(sum(e["joules"] for e in energies) / 6)
    assert math["mean_co2eq_g"] == pytest.approx(sum(e["co2eq_g"] for e in energies) / 6)
    tokens = sum(e["completion_tokens"] for e in energies)
    assert math["mean_joules_per_token"] == pytest.approx(
        sum(e["joules"] for e in energies) / tokens
    )
    assert rows[("fake-model", "code")]["count"] == 2
    assert set(math) == {
        "model",
        "category",
        "count",
        "mean_joules",
        "mean_joules_per_token",
        "mean_co2eq_g",
        "stars",
        "wh_per_1000_queries",
    }
    assert math["stars"] is None  # 6 requests: under the minimum a rating rests on
    assert doc["min_count_for_rating"] == 20


def test_sigterm_under_load_loses_nothing_answered(fake_server: str, tmp_path: Path) -> None:
    db = tmp_path / "requests.db"
    server = proxy_server(
        f"fake={fake_server}",
        extra_args=["--power-source", "constant:50", "--db", str(db)],
        log_path=tmp_path / "proxy.log",
    )
    answered: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(worker: int) -> None:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            for i in range(400):
                if stop.is_set():
                    return
                try:
                    r = c.post(
                        "/v1/chat/completions",
                        json=CHAT,
                        headers={"x-request-id": f"w{worker}-{i}", "x-fake-delay-s": "0.01"},
                    )
                except httpx.HTTPError:
                    return  # the server went away: stop this worker
                if r.status_code == 200:
                    with lock:  # the proxy's own id, the store's key
                        answered.append(r.headers["x-energy-request-id"])

    with server:
        threads = [threading.Thread(target=client, args=(w,)) for w in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while len(answered) < 60 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) is not None
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert len(answered) >= 60
    with RequestStore.open(str(db)) as store:
        missing = {i for i in answered if store.get(i) is None}
    assert not missing, f"{len(missing)} answered requests missing from the store"


@pytest.mark.parametrize("kind", ["corrupt", "unwritable"])
def test_bad_database_is_a_clear_error_at_start(tmp_path: Path, kind: str) -> None:
    if kind == "corrupt":
        db = tmp_path / "requests.db"
        db.write_bytes(b"this is not a database" * 100)
    else:
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("a file where a directory should be")
        db = blocker / "requests.db"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy.cli",
            "serve",
            "--backend",
            "http://127.0.0.1:9",
            "--power-source",
            "constant:1",
            "--db",
            str(db),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert str(db) in done.stderr or "database" in done.stderr.lower()
    assert "Traceback" not in done.stderr
