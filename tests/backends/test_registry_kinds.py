"""The registry with kinds: detection for `auto`, readiness by the kind's health check,
the kind's own metrics, and token counting."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from backends.backend import Backend, BackendConfig
from backends.registry import BackendRegistry
from proxy.relay.upstream import AiohttpUpstream, HttpxUpstream
from tests.support.fakes.kind_servers import (
    KINDS,
    MODELS,
    FakeClient,
    FakeServer,
    GetOnlyClient,
    fake_server,
)
from tests.support.servers import ServerThread


class Recording:
    """Wraps a getter and notes every URL asked for."""

    def __init__(self, inner: FakeClient) -> None:
        self.inner = inner
        self.urls: list[str] = []

    async def get_json(self, url: str, timeout_s: float) -> object:
        self.urls.append(url)
        return await self.inner.get_json(url, timeout_s)

    async def get_text(self, url: str, timeout_s: float) -> str:
        self.urls.append(url)
        return await self.inner.get_text(url, timeout_s)

    async def post_json(self, url: str, body: object, timeout_s: float) -> object:
        self.urls.append(url)
        return await self.inner.post_json(url, body, timeout_s)


def auto_backends() -> list[Backend]:
    return [Backend(BackendConfig(name=k, url=f"http://{k}/v1", kind="auto")) for k in KINDS]


async def test_every_kind_is_detected_and_ready(client: FakeClient) -> None:
    reg = BackendRegistry(auto_backends(), client)
    assert {b.describe()["kind_source"] for b in reg.backends} == {"undetected"}
    await reg.refresh()
    for b in reg.backends:
        assert (b.state.kind, b.state.kind_source, b.state.ready, b.state.last_error) == (
            b.name,
            "detected",
            True,
            "",
        )
        assert b.state.model_ids == MODELS[b.name]
        for model in MODELS[b.name]:
            if model != "meta-llama/Llama-3.1-8B-Instruct" or b.name == "vllm":
                assert reg.lookup(model)[0] is b  # vllm is configured before tgi: first
    doc = reg.backends[1].describe()
    assert doc == {
        "name": "tgi",
        "url": "http://tgi",
        "kind": "tgi",
        "kind_source": "detected",
        "ready": True,
        "models": ["meta-llama/Llama-3.1-8B-Instruct"],
    }


async def test_a_configured_kind_is_not_probed(client: FakeClient) -> None:
    rec = Recording(client)
    reg = BackendRegistry([Backend(BackendConfig(name="t", url="http://tgi", kind="tgi"))], rec)
    await reg.refresh()
    assert sorted(rec.urls) == ["http://tgi/health", "http://tgi/v1/models"]
    assert reg.backends[0].describe()["kind_source"] == "configured"
    assert reg.backends[0].state.ready


async def test_down_backend_stays_undetected_until_it_comes_up(
    client: FakeClient, servers: dict[str, FakeServer]
) -> None:
    servers["tgi"].down = True
    reg = BackendRegistry([Backend(BackendConfig(name="t", url="http://tgi", kind="auto"))], client)
    await reg.refresh()
    b = reg.backends[0]
    assert (b.state.kind, b.state.kind_source, b.state.ready) == ("openai", "undetected", False)
    assert "connection refused" in b.state.last_error
    await reg.refresh()
    assert b.state.kind_source == "undetected"

    servers["tgi"].down = False
    await reg.refresh()
    assert (b.state.kind, b.state.kind_source, b.state.ready, b.state.last_error) == (
        "tgi",
        "detected",
        True,
        "",
    )

    servers["tgi"].down = True  # down again: not ready, but its kind is kept
    await reg.refresh()
    assert (b.state.kind, b.state.kind_source, b.state.ready) == ("tgi", "detected", False)
    assert b.state.model_ids == MODELS["tgi"]  # the last list is kept for routing
    assert reg.lookup(MODELS["tgi"][0]) == (b,)


async def test_ready_needs_the_health_check_too(
    client: FakeClient, servers: dict[str, FakeServer]
) -> None:
    servers["llamacpp"].loading = True  # lists its model, /health says 503
    reg = BackendRegistry(
        [Backend(BackendConfig(name="l", url="http://llamacpp", kind="auto"))], client
    )
    await reg.refresh()
    b = reg.backends[0]
    assert (b.state.kind, b.state.listed, b.state.ready) == ("llamacpp", True, False)
    assert "503" in b.state.last_error
    servers["llamacpp"].loading = False
    await reg.refresh()
    assert b.state.ready and b.state.last_error == ""


async def test_own_metrics_follow_the_kind(client: FakeClient) -> None:
    reg = BackendRegistry(auto_backends(), client)
    await reg.refresh()
    await reg.scrape_own_metrics()
    own = {b.name: b.state.own for b in reg.backends}
    inflight = {b.name: b.own_inflight for b in reg.backends}
    assert own["vllm"] is not None and own["vllm"].prompt_tokens_total == 12345.0
    assert own["tgi"] is not None and own["tgi"].completion_tokens_total == 1500.0
    assert inflight == {
        "vllm": 3.0,
        "tgi": 2.0,
        "llamacpp": 1.0,
        "llama-cpp-python": None,
        "ollama": None,
        "openai": None,
    }


async def test_a_failing_reading_costs_one_period_of_one_backend(client: FakeClient) -> None:
    # What is done with a reading raises once (a meter bug, say): that backend's figures
    # read as unknown for the period, the other backends' are read, and the next period
    # reads again. The scrape loop must never die of it (it ran as one task for good).
    calls: list[str] = []

    def hook(name: str, running: float | None, waiting: float | None) -> None:
        calls.append(name)
        if name == "vllm" and calls.count("vllm") == 1:
            raise RuntimeError("boom")

    reg = BackendRegistry(auto_backends(), client, on_own_metrics=hook)
    await reg.refresh()
    await reg.scrape_own_metrics()
    inflight = {b.name: b.own_inflight for b in reg.backends}
    assert inflight["vllm"] is None and inflight["tgi"] == 2.0
    await reg.scrape_own_metrics()
    assert {b.name: b.own_inflight for b in reg.backends}["vllm"] == 3.0
    assert calls.count("vllm") == 2


async def test_metrics_of_kinds_without_them_are_not_asked_for(client: FakeClient) -> None:
    rec = Recording(client)
    backends = [
        Backend(BackendConfig(name="p", url="http://llama-cpp-python", kind="llama-cpp-python")),
        Backend(BackendConfig(name="o", url="http://ollama", kind="ollama")),
    ]
    reg = BackendRegistry(backends, rec)
    await reg.scrape_own_metrics()
    assert rec.urls == []


@pytest.mark.parametrize(
    ("kind", "tokens"),
    [("vllm", 6), ("tgi", 6), ("llamacpp", 5), ("llama-cpp-python", 5), ("ollama", None)],
)
async def test_count_tokens(kind: str, tokens: int | None, client: FakeClient) -> None:
    reg = BackendRegistry(
        [Backend(BackendConfig(name="b", url=f"http://{kind}", kind="auto"))], client
    )
    await reg.refresh()
    b = reg.backends[0]
    assert await reg.count_tokens(b, MODELS[kind][0], "Hello, energy world!") == tokens


async def test_count_tokens_needs_a_getter_that_posts(client: FakeClient) -> None:
    reg = BackendRegistry(
        [Backend(BackendConfig(name="v", url="http://vllm", kind="vllm"))], GetOnlyClient(client)
    )
    await reg.refresh()
    assert reg.backends[0].state.ready
    assert await reg.count_tokens(reg.backends[0], "m", "text") is None


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown backend kind 'vLLM'"):
        Backend(BackendConfig(name="x", url="http://x", kind="vLLM"))


def test_spec_tells_the_relay_about_usage_in_streams() -> None:
    usage = {
        k: Backend(BackendConfig(name=k, url="http://x", kind=k)).spec.stream_usage for k in KINDS
    }
    assert usage == {
        "vllm": True,
        "tgi": True,
        "llamacpp": True,
        "llama-cpp-python": False,
        "ollama": True,
        "openai": True,
    }


# --- over real sockets, with the proxy's own upstream clients ------------------------


@pytest.fixture
def vllm_url() -> Iterator[str]:
    srv = fake_server("vllm")
    with ServerThread(srv.app, lifespan="off") as url:
        yield url


@pytest.mark.parametrize("client_kind", ["aiohttp", "httpx"])
async def test_detection_and_health_with_the_proxy_clients(vllm_url: str, client_kind: str) -> None:
    upstream = AiohttpUpstream(5.0) if client_kind == "aiohttp" else HttpxUpstream(5.0)
    try:
        reg = BackendRegistry(
            [Backend(BackendConfig(name="v", url=vllm_url, kind="auto"))], upstream
        )
        await reg.refresh()
        await reg.scrape_own_metrics()
        b = reg.backends[0]
        assert (b.state.kind, b.state.ready, b.state.last_error) == (
            "vllm",
            True,
            "",
        )  # /health: an empty 200
        assert b.own_inflight == 3.0
    finally:
        await upstream.aclose()


async def test_a_busy_serial_server_is_left_alone(client: FakeClient) -> None:
    """llama-cpp-python cuts a running stream off when any other request arrives: while
    the proxy has a request in flight to it, refreshes and scrapes send it nothing."""
    rec = Recording(client)
    serial = Backend(
        BackendConfig(name="lcp", url="http://llama-cpp-python", kind="llama-cpp-python")
    )
    other = Backend(BackendConfig(name="v", url="http://vllm", kind="vllm"))
    reg = BackendRegistry([serial, other], rec)
    await reg.refresh()
    assert serial.state.ready and other.state.ready
    rec.urls.clear()
    serial.traffic.inflight = other.traffic.inflight = 1
    await reg.refresh()
    await reg.scrape_own_metrics()
    assert rec.urls and not any(u.startswith("http://llama-cpp-python") for u in rec.urls)
    assert serial.state.ready and serial.state.model_ids  # it keeps what it had
    serial.traffic.inflight = 0
    await reg.refresh()
    assert any(u.startswith("http://llama-cpp-python") for u in rec.urls)


async def test_what_requests_tell_moves_readiness(
    client: FakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed request marks a backend down at once (logged once per outage); a request
    it answers marks it up again, without waiting for the next refresh."""
    reg = BackendRegistry(
        [Backend(BackendConfig(name="vllm", url="http://vllm", kind="vllm"))], client
    )
    await reg.refresh()
    (b,) = reg.backends
    assert b.state.ready
    with caplog.at_level("WARNING", logger="energy_proxy.backends"):
        reg.note_unreachable(b, "cannot reach the backend: Connection refused")
        reg.note_unreachable(b, "cannot reach the backend: Connection refused")
        assert (
            not b.state.ready
            and b.describe()["error"] == "cannot reach the backend: Connection refused"
        )
        reg.note_answered(b)
        assert b.state.ready and "error" not in b.describe()
        reg.note_answered(b)  # already up: nothing to say
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "backend vllm (http://vllm) not ready: cannot reach the backend: Connection refused",
        "backend vllm (http://vllm) is ready again",
    ]


async def test_a_backend_never_listed_is_not_made_ready_by_an_answer(client: FakeClient) -> None:
    reg = BackendRegistry(
        [Backend(BackendConfig(name="vllm", url="http://vllm", kind="vllm"))], client
    )
    (b,) = reg.backends
    reg.note_unreachable(b, "cannot reach the backend")
    reg.note_answered(b)  # readiness also needs its model list: the refresh decides
    assert not b.state.ready
