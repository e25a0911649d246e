"""Large bodies and answers against a real `energy-proxy serve` and the fast stand-in
backend on real sockets: memory stays a small multiple of the bytes in flight (the
process's own peak, VmHWM, reset through /proc/PID/clear_refs), and a large answer still
carries its energy and its token counts. bench/memory.py measures the full sizes."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson
import pytest

from backends.local.launch import free_port
from bench.memory import chat_body, status_kb
from proxy.relay.json_tail import LARGE_ANSWER_BYTES
from tests.support.paths import REPO_ROOT
from tests.support.polling import wait_for

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="reads the kernel's peak RSS"
)
MIB = 1024 * 1024


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def _stack(tmp_path: Path, embeddings_bytes: int) -> Iterator[tuple[str, int]]:
    """(the proxy's URL, its pid) in front of the fast backend."""
    b_port, p_port = free_port(), free_port()
    log = (tmp_path / "stack.log").open("w")
    backend = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tests/support/fakes/fast_backend.py"),
         "--port", str(b_port), "--embeddings-bytes", str(embeddings_bytes)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    proxy = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--port", str(p_port),
         "--backend", f"http://127.0.0.1:{b_port}", "--power-source", "constant:50",
         "--db", str(tmp_path / "r.db")],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{p_port}"
    try:
        assert wait_for(lambda: _up(url + "/readyz"), timeout_s=60), "the proxy did not start"
        yield url, proxy.pid
    finally:
        for p in (proxy, backend):
            p.terminate()
            p.wait(timeout=30)
        log.close()


def _peak_above_mib(pid: int, work: object) -> float:
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = status_kb(pid, "VmRSS")
    work()  # type: ignore[operator]
    return (status_kb(pid, "VmHWM") - before) / 1024


def test_a_large_answer_costs_about_its_size_and_keeps_its_energy(tmp_path: Path) -> None:
    size = 40 * 1000 * 1000
    assert size > LARGE_ANSWER_BYTES
    got: list[httpx.Response] = []
    with _stack(tmp_path, size) as (url, pid):

        def ask() -> None:
            got.append(
                httpx.post(
                    url + "/v1/embeddings",
                    json={"model": "fake-model", "input": "x"},
                    timeout=120,
                )
            )

        peak = _peak_above_mib(pid, ask)
    resp = got[0]
    assert resp.status_code == 200
    body_mib = len(resp.content) / MIB
    # Parsed whole it took ~6x its size; read at its tail, its own bytes and little more.
    assert peak < 2.0 * body_mib, (peak, body_mib)
    doc = orjson.loads(resp.content)
    energy = doc["energy"]
    assert list(doc)[-1] == "energy"
    assert energy["joules"] == pytest.approx(float(resp.headers["x-energy-joules"]), rel=1e-3)
    # The usage at the answer's end was read: the backend's count, not an estimate.
    assert energy["prompt_tokens"] == doc["usage"]["prompt_tokens"] == len(doc["data"])
    assert doc["usage"]["energy_millijoules"] == round(energy["joules"] * 1000)
    assert int(resp.headers["content-length"]) == len(resp.content)


def test_concurrent_large_bodies_cost_a_small_multiple_of_their_bytes(tmp_path: Path) -> None:
    body = chat_body(100_000)
    n = 6
    codes: list[int] = []
    with _stack(tmp_path, 0) as (url, pid):

        def send_all() -> None:
            def one(_: int) -> int:
                return httpx.post(
                    url + "/v1/chat/completions",
                    content=body,
                    headers={"content-type": "application/json"},
                    timeout=120,
                ).status_code

            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                codes.extend(pool.map(one, range(n)))

        peak = _peak_above_mib(pid, send_all)
    assert codes == [200] * n
    sent_mib = n * len(body) / MIB
    # Each body's parse was held for its request's life: ~6x the bytes (8.5x in the
    # issue's run). Now one parse at a time, beside the bytes themselves: the bodies as
    # received (1x), what the upstream socket has not taken yet (up to 1x more when the
    # backend reads slowly, as on a loaded machine: 3.6x was seen in the full suite) and
    # one body's parse (~7x of one of six).
    assert peak < 4.5 * sent_mib, (peak, sent_mib)
