"""Work sent around the proxy, on real sockets: the backend's gauges show more running
than the proxy has in flight, and the difference is charged to the untracked account,
not to the requests the proxy meters (a constant 100 W source: alone, a request is told
all of it)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import serve_proxy
from tests.proxy.relay.test_sockets import metric_value
from tests.support.fakes.openai_backend import FakeState
from tests.support.polling import wait_for

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}
SLOW = {"x-fake-delay-s": "1.0"}


@pytest.fixture
def proxy_url(fake_server: str, tmp_path: Path) -> Iterator[str]:
    with serve_proxy(tmp_path, fake_server, backend_metrics_s=0.05) as url:
        yield url


def _untracked(proxy_url: str) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(f"{proxy_url}/readyz").json()["backends"][0]["untracked"]
    return doc


def _watts(energy: dict[str, Any]) -> float:
    return float(energy["joules"]) / float(energy["duration_s"])


def test_bypassing_work_takes_its_share_and_is_counted(
    proxy_url: str, fake: tuple[Any, FakeState]
) -> None:
    _, state = fake
    # The gauges are read (the backend exports them) and show nothing around the proxy.
    assert wait_for(lambda: metric_value(proxy_url, "energy_proxy_backend_inflight_requests") == 0)
    alone = httpx.post(f"{proxy_url}/v1/chat/completions", json=CHAT, headers=SLOW, timeout=30)
    alone_energy = alone.json()["energy"]
    assert alone_energy["shared_with_untracked"] is False
    assert _watts(alone_energy) > 95.0

    state.bypass_running = 1  # one request reaches the backend without the proxy
    got: dict[str, Any] = {}
    try:
        # Read while the proxy has a request of its own in flight (a reading taken with
        # none may be an idle engine's stale figure, and protects nobody: it counts none).
        assert _untracked(proxy_url)["requests"] == 0
        def metered() -> None:
            r = httpx.post(f"{proxy_url}/v1/chat/completions", json=CHAT, headers=SLOW, timeout=30)
            got.update(r.json())

        worker = threading.Thread(target=metered)
        worker.start()
        assert wait_for(lambda: _untracked(proxy_url)["requests"] == 1)
        worker.join()
        energy = got["energy"]
    finally:
        state.bypass_running = 0
    assert energy["shared_with_untracked"] is True
    # An equal share with the untracked request is 50 W; the phantom's weight is a decoding
    # request's, the metered one's its own: not exactly half, never all of it.
    assert 20.0 < _watts(energy) < 80.0
    # The gauges fall back: the account stands for nobody again, and holds what it drew.
    assert wait_for(lambda: _untracked(proxy_url)["requests"] == 0)
    account = _untracked(proxy_url)
    assert account["joules"] > 0.0
    assert metric_value(proxy_url, "energy_proxy_energy_joules_total", scope="untracked") > 0.0
    assert metric_value(
        proxy_url, "energy_proxy_backend_untracked_energy_joules_total", backend="fake"
    ) == pytest.approx(account["joules"], rel=0.01)
