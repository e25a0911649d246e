"""The proxy on a real socket with its real (aiohttp) upstream client, in front of the
fake backend on another real socket: disconnects, dead backends, timeouts."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from metering.sources.constant import ConstantSource
from proxy.app import create_app
from proxy.errors import BackendUnreachable
from proxy.relay.upstream import make_upstream
from tests.conftest import proxy_settings, serve_proxy
from tests.support.fakes.openai_backend import FakeState
from tests.support.polling import wait_for
from tests.support.servers import ServerThread

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}


def metric_value(proxy_url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{proxy_url}/metrics").text
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def proxy_url(fake_server: str, tmp_path: Path) -> Iterator[str]:
    with serve_proxy(tmp_path, fake_server, backend_timeout=1.0) as url:
        yield url


def test_stream_through_aiohttp_upstream(proxy_url: str) -> None:
    with httpx.stream(
        "POST", f"{proxy_url}/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 4}
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    datas = [ln[6:] for ln in body.splitlines() if ln.startswith("data: ")]
    assert datas[-1] == "[DONE]"
    energy = json.loads(datas[-2])["energy"]
    assert energy["joules"] > 0 and energy["completion_tokens"] == 4


def test_client_disconnect_mid_stream_closes_upstream_and_counts_energy(
    proxy_url: str, fake: tuple[Any, FakeState]
) -> None:
    _, state = fake
    with httpx.stream(
        "POST",
        f"{proxy_url}/v1/chat/completions",
        json={**CHAT, "stream": True, "max_tokens": 200},
        headers={"x-fake-token-delay-s": "0.05", "x-request-id": "gone-1"},
    ) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(g.startswith("data: ") for g in got)
    # The client hung up: the proxy must drop the upstream request and still account it.
    assert wait_for(lambda: state.abandoned == 1)
    assert wait_for(
        lambda: metric_value(proxy_url, "energy_proxy_requests_total", status="499") == 1
    )
    record = httpx.get(f"{proxy_url}/v1/energy/requests/gone-1")
    assert record.status_code == 200
    assert record.json()["joules"] > 0
    assert record.json()["completion_tokens"] >= 1
    assert metric_value(proxy_url, "energy_proxy_inflight_requests") == 0


def test_client_disconnect_while_waiting_for_first_byte(
    proxy_url: str, fake: tuple[Any, FakeState]
) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{proxy_url}/v1/chat/completions",
            json=CHAT,
            headers={"x-fake-delay-s": "0.8"},
            timeout=0.2,
        )
    assert wait_for(
        lambda: metric_value(proxy_url, "energy_proxy_requests_total", status="499") == 1
    )


def test_backend_timeout_is_504(proxy_url: str) -> None:
    r = httpx.post(
        f"{proxy_url}/v1/chat/completions", json=CHAT, headers={"x-fake-delay-s": "3"}, timeout=10
    )
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "backend_timeout"
    assert metric_value(proxy_url, "energy_proxy_requests_total", status="504") == 1


def test_backend_dies_mid_stream(proxy_url: str) -> None:
    r = httpx.post(
        f"{proxy_url}/v1/chat/completions",
        json={**CHAT, "stream": True, "max_tokens": 10},
        headers={"x-fake-die-after": "2"},
    )
    assert r.status_code == 200  # headers were already out when it died
    datas = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
    # The energy first (an SDK raises at the error event), then the error, with the same
    # energy beside its message.
    assert datas[-2]["energy"]["joules"] > 0
    assert datas[-1]["error"]["code"] == "backend_unreachable"
    assert datas[-1]["error"]["energy"] == datas[-2]["energy"]
    assert "[DONE]" not in r.text
    # The proxy survives and serves the next request.
    assert httpx.post(f"{proxy_url}/v1/chat/completions", json=CHAT).status_code == 200


def test_openai_client_gets_the_energy_of_a_stream_the_backend_broke_off(
    proxy_url: str,
) -> None:
    """The `openai` client raises at an error event: the app iterating the stream has the
    energy chunk before the exception, and the exception's body carries it too."""
    client = openai.OpenAI(base_url=f"{proxy_url}/v1", api_key="none", max_retries=0)
    stream = client.chat.completions.create(
        model=CHAT["model"],
        messages=CHAT["messages"],
        stream=True,
        max_tokens=10,
        extra_headers={"x-fake-die-after": "2"},
    )
    energies: list[dict[str, Any]] = []
    with pytest.raises(openai.APIError) as raised:
        for chunk in stream:
            extra = chunk.model_extra or {}
            if "energy" in extra:
                energies.append(extra["energy"])
    # Cut off before the answer ended: no finish chunk, the energy on the final one only.
    assert len(energies) == 1 and energies[0]["joules"] > 0
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["energy"] == energies[0]
    assert raised.value.body["code"] == "backend_unreachable"


def test_backend_down_is_502_and_proxy_stays_up(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    app = create_app(
        proxy_settings(tmp_path, backends=[f"dead={dead}"]),
        sources=[ConstantSource(10.0, start_s=time.monotonic())],
    )
    with ServerThread(app) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT)
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "backend_unreachable"
        assert httpx.get(f"{url}/healthz").status_code == 200
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503
        assert ready.json()["backends"][0]["ready"] is False


def test_metrics_parse_and_conserve_energy(proxy_url: str) -> None:
    for _ in range(3):
        assert httpx.post(f"{proxy_url}/v1/chat/completions", json=CHAT).status_code == 200
    attributed = metric_value(
        proxy_url, "energy_proxy_energy_joules_total", source="constant", scope="attributed"
    )
    observed = metric_value(proxy_url, "energy_proxy_request_energy_joules_sum")
    assert attributed > 0
    # Every attributed joule went to one of the finished requests.
    assert observed == pytest.approx(attributed, rel=1e-9)
    assert metric_value(proxy_url, "energy_proxy_requests_total", status="200") == 3
    assert metric_value(proxy_url, "energy_proxy_power_watts", source="constant") == 100.0


@pytest.mark.parametrize("kind", ["aiohttp", "httpx"])
async def test_small_requests_off_the_request_path(fake_server: str, kind: str) -> None:
    """get_json / get_text / post_json of both upstream clients, over a real socket."""
    up = make_upstream(kind, 10.0)
    try:
        models = await up.get_json(f"{fake_server}/v1/models", 5.0)
        assert isinstance(models, dict) and models["data"][0]["id"] == "fake-model"
        assert "vllm:num_requests_running" in await up.get_text(f"{fake_server}/metrics", 5.0)
        doc = await up.post_json(
            f"{fake_server}/extras/tokenize", {"input": "a b c", "model": "fake-model"}, 5.0
        )
        assert doc == {"tokens": [0, 1, 2]}
        with pytest.raises(BackendUnreachable, match="answered 404"):
            await up.get_json(f"{fake_server}/nowhere", 5.0)
    finally:
        await up.aclose()


def test_the_relay_counts_a_stream_s_tokens_for_the_split(
    fake_server: str, tmp_path: Path
) -> None:
    """Each chunk a decoding stream relays counts one step of its backend: the split
    counts the steps a prompt's prefill took by them (metering/accounting/chunks.py)."""
    server = serve_proxy(tmp_path, fake_server)
    with server as url:
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 6}
        ) as r:
            chunks = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        queue = server.server.config.app.meter.lane("fake").queue
        # The tokens after the first, however the backend's events were chunked (not its
        # finish, usage or [DONE]).
        assert queue.streamed == 5, (queue.streamed, chunks)
        assert queue.decode_streams == 0  # it ended: no stream decodes now


def test_an_energy_proxy_behind_another_tells_one_set_of_figures(
    fake_server: str, tmp_path: Path
) -> None:
    """Chained proxies (or a backend that sends its own x-energy-* headers): the client
    gets this proxy's figures once, never two `x-energy-joules` or two `energy` keys."""
    (tmp_path / "inner").mkdir()
    (tmp_path / "outer").mkdir()
    with (
        serve_proxy(tmp_path / "inner", fake_server) as inner,
        serve_proxy(tmp_path / "outer", inner) as outer,
    ):
        r = httpx.post(f"{outer}/v1/chat/completions", json={**CHAT, "max_tokens": 3})
    assert r.status_code == 200
    for name in ("x-energy-joules", "x-energy-method", "x-co2eq-grams", "x-sci-grams",
                 "x-carbon-intensity", "x-prompt-category", "x-energy-request-id"):
        assert len(r.headers.get_list(name)) == 1, name  # fmt: skip
    assert r.text.count('"energy":') == 1
    energy = r.json()["energy"]
    assert r.headers["x-energy-request-id"] == energy["request_id"]
    assert float(r.headers["x-energy-joules"]) == pytest.approx(energy["joules"], rel=5e-4)
