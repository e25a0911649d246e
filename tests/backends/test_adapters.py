"""Each kind's adapter against a fake server of that kind: health, models, tokens, metrics."""

from __future__ import annotations

import pytest

from backends.adapters import ModelListError, adapter_for
from backends.kinds import KIND_NAMES
from backends.own_metrics import OwnMetrics
from tests.support.fakes.kind_servers import (
    KINDS,
    MODELS,
    TOKENS,
    FakeClient,
    FakeServer,
)

TEXT = "Hello, energy world!"


def test_every_kind_has_an_adapter_and_a_fake() -> None:
    assert set(KIND_NAMES) == set(KINDS)
    for kind in KIND_NAMES:
        assert adapter_for(kind).name == kind
    with pytest.raises(ValueError, match="unknown backend kind 'sglang'"):
        adapter_for("sglang")


# --- health --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_healthy(kind: str, client: FakeClient) -> None:
    assert await adapter_for(kind).check_health(client, f"http://{kind}") is None


@pytest.mark.parametrize("kind", ["vllm", "tgi", "llamacpp", "ollama"])
async def test_down_is_unhealthy(
    kind: str, client: FakeClient, servers: dict[str, FakeServer]
) -> None:
    servers[kind].down = True
    problem = await adapter_for(kind).check_health(client, f"http://{kind}")
    assert problem is not None and "health check failed" in problem


@pytest.mark.parametrize("kind", ["llamacpp", "tgi"])
async def test_loading_is_unhealthy(
    kind: str, client: FakeClient, servers: dict[str, FakeServer]
) -> None:
    servers[kind].loading = True
    problem = await adapter_for(kind).check_health(client, f"http://{kind}")
    assert problem is not None and "503" in problem


async def test_llamacpp_health_must_say_ok() -> None:
    class Says:
        async def get_json(self, url: str, timeout_s: float) -> object:
            return {"status": "no slot available"}

        async def get_text(self, url: str, timeout_s: float) -> str:
            raise AssertionError("llama-server's health is JSON")

    problem = await adapter_for("llamacpp").check_health(Says(), "http://x")
    assert problem is not None and "no slot available" in problem


@pytest.mark.parametrize("kind", ["llama-cpp-python", "openai"])
async def test_kinds_without_health_endpoint_leave_it_to_the_model_list(
    kind: str, client: FakeClient, servers: dict[str, FakeServer]
) -> None:
    servers[kind].down = True
    adapter = adapter_for(kind)
    assert adapter.kind.health is None
    assert await adapter.check_health(client, f"http://{kind}") is None
    with pytest.raises(ModelListError, match="connection refused"):
        await adapter.list_models(client, f"http://{kind}")


# --- models --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_models(kind: str, client: FakeClient) -> None:
    models = await adapter_for(kind).list_models(client, f"http://{kind}")
    assert [m["id"] for m in models] == MODELS[kind]


async def test_ollama_without_openai_list_falls_back_to_tags(
    client: FakeClient, servers: dict[str, FakeServer]
) -> None:
    servers["ollama"].openai_models = False
    models = await adapter_for("ollama").list_models(client, "http://ollama")
    assert models == [
        {"id": "llama3.2:latest", "object": "model", "owned_by": "library"},
        {"id": "all-minilm:latest", "object": "model", "owned_by": "library"},
    ]


async def test_a_list_that_is_not_a_model_list() -> None:
    class Odd:
        async def get_json(self, url: str, timeout_s: float) -> object:
            return {"detail": "Not Found"}

        async def get_text(self, url: str, timeout_s: float) -> str:
            return ""

    with pytest.raises(ModelListError, match="did not return a model list"):
        await adapter_for("vllm").list_models(Odd(), "http://x")


# --- token counting ------------------------------------------------------------------

EXPECTED_BODY = {
    "vllm": ("/tokenize", {"model": "m", "prompt": TEXT}),
    "tgi": ("/tokenize", {"inputs": TEXT}),
    "llamacpp": ("/tokenize", {"content": TEXT}),
    "llama-cpp-python": ("/extras/tokenize", {"input": TEXT, "model": "m"}),
}


@pytest.mark.parametrize("kind", KINDS)
async def test_count_tokens(kind: str, client: FakeClient, servers: dict[str, FakeServer]) -> None:
    count = await adapter_for(kind).count_tokens(client, f"http://{kind}", "m", TEXT)
    assert count == TOKENS.get(kind)
    if kind in EXPECTED_BODY:
        path, body = EXPECTED_BODY[kind]
        assert servers[kind].requests == [("POST", path, body)]
    else:
        assert servers[kind].requests == []  # no endpoint: nothing is asked


@pytest.mark.parametrize("kind", list(TOKENS))
async def test_count_tokens_never_raises(
    kind: str, client: FakeClient, servers: dict[str, FakeServer]
) -> None:
    servers[kind].down = True
    assert await adapter_for(kind).count_tokens(client, f"http://{kind}", "m", TEXT) is None

    class Garbage:
        async def post_json(self, url: str, body: object, timeout_s: float) -> object:
            return {"unexpected": True}

    assert await adapter_for(kind).count_tokens(Garbage(), "http://x", "m", TEXT) is None


# --- own metrics ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("vllm", OwnMetrics(3.0, 12345.0, 6789.0, waiting=7.0)),
        ("tgi", OwnMetrics(2.0, 2048.0, 1500.0, waiting=0.0)),
        ("llamacpp", OwnMetrics(1.0, 75.0, 31.0, waiting=0.0)),
        ("llama-cpp-python", None),  # no /metrics
        ("ollama", None),  # no /metrics
        ("openai", None),  # tried, but this one has none
    ],
)
async def test_own_metrics(kind: str, expected: OwnMetrics | None, client: FakeClient) -> None:
    assert await adapter_for(kind).own_metrics(client, f"http://{kind}") == expected


async def test_llamacpp_without_metrics_flag(
    client: FakeClient, servers: dict[str, FakeServer]
) -> None:
    servers["llamacpp"].metrics = False
    assert await adapter_for("llamacpp").own_metrics(client, "http://llamacpp") is None
