"""The metered routes over httpx.ASGITransport: forwarding, energy, usage, errors."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from metering.accounting.report import header_number
from metering.sources.constant import ConstantSource
from proxy.app import EnergyProxyApp, create_app
from proxy.observe.request_log import RequestLog
from proxy.relay.upstream import HttpxUpstream
from tests.conftest import proxy_settings
from tests.support.fakes.openai_backend import FakeState

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "say hello to me"}]}


def sse_payloads(text: str) -> list[Any]:
    """The decoded `data:` payloads of an SSE body ("[DONE]" kept as a string)."""
    out: list[Any] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                data = line[6:]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_non_streaming_energy_in_headers_and_body(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4})
    assert r.status_code == 200
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "Hello, energy world"
    energy = body["energy"]
    assert energy["joules"] > 0
    assert r.headers["x-energy-joules"] == header_number(energy["joules"])
    assert r.headers["x-energy-method"] == energy["method"] == "constant"
    assert r.headers["x-carbon-intensity-source"] == "static"
    assert float(r.headers["x-carbon-intensity"]) == 500.0
    assert energy["co2eq_g"] == pytest.approx(energy["joules"] / 3.6e6 * 500.0, rel=1e-12)
    assert r.headers["x-co2eq-grams"] == header_number(energy["co2eq_g"])
    assert r.headers["x-prompt-category"] == energy["category"] == "other"
    assert energy["prompt_tokens"] == 4 and energy["completion_tokens"] == 4
    assert energy["tokens_source"] == "backend"
    assert energy["joules_per_token"] == pytest.approx(energy["joules"] / 4)
    # constant 100 W with idle fixed at 40 W: the dynamic part is 60% of the total
    assert energy["dynamic_joules"] == pytest.approx(energy["joules"] * 0.6, rel=1e-6)
    assert r.headers["x-request-id"] == energy["request_id"]
    assert body["usage"]["completion_tokens"] == 4


async def test_request_id_kept_from_client(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"  # echoed
    energy = r.json()["energy"]
    # The record's id is the proxy's own; the client's is kept beside it.
    assert energy["request_id"] == r.headers["x-energy-request-id"] != "abc-123"
    assert energy["request_id"].startswith("req-") and energy["client_request_id"] == "abc-123"
    for lookup in ("abc-123", energy["request_id"]):  # either id finds it
        r2 = await client.get(f"/v1/energy/requests/{lookup}")
        assert r2.status_code == 200 and r2.json()["joules"] == energy["joules"]
    r3 = await client.get("/healthz", headers={"x-request-id": "h-1"})
    assert r3.headers["x-request-id"] == "h-1"
    assert (await client.get("/v1/energy/requests/nope")).status_code == 404


async def test_stream_final_event_carries_energy_and_hides_usage(
    client: httpx.AsyncClient, fake: tuple[Any, FakeState]
) -> None:
    _, state = fake
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3, "stream": True})
    assert r.status_code == 200
    events = sse_payloads(r.text)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["choices"] == [] and final["id"] == "cmpl-fake-1"
    energy = final["energy"]
    assert energy["joules"] > 0 and energy["completion_tokens"] == 3
    assert energy["tokens_source"] == "backend"
    # The proxy asked for usage; the client did not, so it sees neither the chunk nor the field.
    sent = state.requests[-1]["body"]
    assert sent["stream_options"] == {"include_usage": True}
    assert not any("usage" in e for e in events[:-2] if isinstance(e, dict))
    contents = [
        e["choices"][0]["delta"].get("content")
        for e in events[:-2]
        if isinstance(e, dict) and e["choices"]
    ]
    assert "".join(c for c in contents if c) == "Hello, energy"


async def test_stream_usage_forwarded_when_client_asked(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={**CHAT, "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}},
    )
    events = sse_payloads(r.text)
    usage_chunks = [e for e in events if isinstance(e, dict) and e.get("usage")]
    assert len(usage_chunks) == 1 and usage_chunks[0]["usage"]["completion_tokens"] == 2
    assert events[-2]["energy"]["completion_tokens"] == 2


async def test_stream_without_backend_usage_is_counted_by_proxy(
    client: httpx.AsyncClient, fake: tuple[Any, FakeState]
) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={**CHAT, "max_tokens": 5, "stream": True},
        headers={"x-fake-no-usage": "1", "x-fake-sep": "crlf"},
    )
    events = sse_payloads(r.text)
    energy = events[-2]["energy"]
    # No non-streamed answer of this model has shown what its chat template adds yet.
    assert energy["tokens_source"] == "proxy; prompt text only"
    assert energy["completion_tokens"] == 5
    assert r.text.endswith("data: [DONE]\r\n\r\n")
    # No usage came: the prompt is counted by the backend's own tokenizer (this fake is
    # detected as vLLM, whose /tokenize it answers), once.
    assert fake[1].tokenize_calls == 1
    assert energy["prompt_tokens"] == 4  # "say hello to me", by the fake's tokenizer
    # A non-streamed answer carries the backend's count: its text is counted once more,
    # and the template's share (none, for this fake) learnt for this model and shape.
    plain = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5})
    assert plain.json()["usage"]["prompt_tokens"] == 4 and fake[1].tokenize_calls == 2
    r = await client.post(
        "/v1/chat/completions",
        json={**CHAT, "max_tokens": 5, "stream": True},
        headers={"x-fake-no-usage": "1"},
    )
    energy = sse_payloads(r.text)[-2]["energy"]
    assert energy["tokens_source"] == "proxy" and energy["prompt_tokens"] == 4
    await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5})
    assert fake[1].tokenize_calls == 3  # learnt once, never asked again for it


async def test_completions_and_embeddings_are_metered(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"model": "fake-model", "prompt": "a b c"})
    assert r.status_code == 200 and r.json()["energy"]["prompt_tokens"] == 3
    r = await client.post(
        "/v1/embeddings", json={"model": "fake-model", "input": ["one two", "three"]}
    )
    assert r.status_code == 200
    assert len(r.json()["data"]) == 2
    assert r.json()["energy"]["completion_tokens"] == 0
    assert float(r.headers["x-energy-joules"]) > 0


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b'{"messages": []}', 400, "missing_model"),
        (b'{"model": ""}', 400, "missing_model"),
        (b'{"model": "no-such-model"}', 404, "model_not_found"),
    ],
)
async def test_bad_requests_get_openai_errors(
    client: httpx.AsyncClient, content: bytes, status: int, code: str
) -> None:
    r = await client.post(
        "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
    )
    assert r.status_code == status
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]
    assert r.headers["x-request-id"]


async def test_body_over_limit_is_413(client: httpx.AsyncClient, proxy_app: EnergyProxyApp) -> None:
    limit = proxy_app.ctx.max_body_bytes
    big = json.dumps({**CHAT, "pad": "x" * limit})
    r = await client.post("/v1/chat/completions", content=big)
    assert r.status_code == 413
    assert str(limit) in r.json()["error"]["message"]


async def test_unknown_category_is_400_naming_allowed(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=CHAT, headers={"x-prompt-category": "poem"})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "poem" in msg and "code" in msg and "translation" in msg
    r = await client.post("/v1/chat/completions", json=CHAT, headers={"x-prompt-category": "SQL"})
    assert r.status_code == 200 and r.headers["x-prompt-category"] == "sql"


async def test_backend_error_passes_through_unchanged_with_its_energy(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/v1/chat/completions", json=CHAT, headers={"x-fake-error": "429"})
    assert r.status_code == 429
    # The body is the backend's, byte for byte; what the failed request cost is in headers.
    assert r.json() == {"error": {"message": "fake backend error", "type": "fake", "code": 429}}
    assert float(r.headers["x-energy-joules"]) > 0.0
    assert r.headers["x-energy-method"] == "constant"
    record = await client.get(f"/v1/energy/requests/{r.headers['x-energy-request-id']}")
    assert record.status_code == 200
    assert header_number(record.json()["joules"]) == r.headers["x-energy-joules"]


async def test_hop_by_hop_and_encoding_not_forwarded(
    client: httpx.AsyncClient, fake: tuple[Any, FakeState]
) -> None:
    _, state = fake
    await client.post(
        "/v1/chat/completions",
        json=CHAT,
        headers={
            "connection": "keep-alive, x-secret-hop",
            "x-secret-hop": "1",
            "accept-encoding": "gzip",
            "authorization": "Bearer user-key",
            "x-custom": "kept",
        },
    )
    seen = state.requests[-1]["headers"]
    assert "x-secret-hop" not in seen
    assert seen["accept-encoding"] == "identity"  # so the proxy can read and extend the body
    assert seen["x-custom"] == "kept"
    # The client's Authorization is for the proxy: never passed on unless the backend is
    # configured with forward_authorization.
    assert "authorization" not in seen


async def test_models_merged_and_readiness(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    assert [m["id"] for m in r.json()["data"]] == ["fake-model"]
    r = await client.get("/readyz")
    assert r.status_code == 200
    doc = r.json()
    assert doc["backends"][0]["name"] == "fake" and doc["backends"][0]["ready"] is True
    assert doc["backends"][0]["models"] == ["fake-model"]
    assert doc["power_sources"] == [
        {"name": "constant", "method": "constant", "ok": True, "hardware": ""}
    ]


async def test_get_on_metered_route_is_405(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert r.headers["allow"] == "POST, OPTIONS"


async def test_one_json_log_line_per_request_without_prompt_text(
    fake: tuple[Any, FakeState], tmp_path: Path
) -> None:
    backend_app, _ = fake
    stream = io.BytesIO()
    app = create_app(
        proxy_settings(tmp_path),
        upstream=HttpxUpstream(30.0, transport=httpx.ASGITransport(app=backend_app)),
        sources=[ConstantSource(100.0, start_s=0.0)],
        request_log=RequestLog(stream),
    )
    secret = "my-very-private-prompt-text"
    async with (
        app.running(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as c,
    ):
        r = await c.post(
            "/v1/chat/completions",
            json={"model": "fake-model", "messages": [{"role": "user", "content": secret}]},
        )
    assert r.status_code == 200
    lines = stream.getvalue().decode().splitlines()  # flushed at shutdown
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["request_id"] == r.headers["x-energy-request-id"]
    assert entry["tenant"] is None and entry["client_request_id"] is None  # no keys, no id
    assert entry["model"] == "fake-model" and entry["status"] == 200
    assert entry["joules"] == pytest.approx(r.json()["energy"]["joules"], abs=1e-6)
    assert secret not in lines[0]


def test_request_log_survives_a_broken_stream() -> None:
    class Broken(io.BytesIO):
        def write(self, _: Any) -> int:
            raise OSError("disk full")

    log = RequestLog(Broken())
    log.write({"request_id": "a"})
    log.flush()
    assert log.dropped_lines == 1


async def test_a_path_outside_the_passthrough_list_gets_openai_error(
    client: httpx.AsyncClient, fake: tuple[Any, FakeState]
) -> None:
    _, state = fake
    before = len(state.requests)
    r = await client.post("/invocations", json=CHAT)
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "--passthrough" in r.json()["error"]["message"]
    assert r.headers["x-request-id"]
    assert len(state.requests) == before  # it never reached the backend


async def test_an_unknown_api_path_is_the_backends_own_answer(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.text == "Not Found"  # the fake backend's (Starlette's)
    assert r.headers["x-request-id"]


async def test_a_host_without_a_gpu_gets_no_gpu_servers_embodied_figure(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4})
    energy = r.json()["energy"]
    # No GPU measured (a constant source): no default fits, none is used, and it says so.
    assert energy["embodied_g"] == 0.0
    assert energy["embodied_basis"].startswith("none: ")
    assert energy["sci_g"] == energy["co2eq_g"]
    assert r.headers["x-sci-grams"] == r.headers["x-co2eq-grams"]
    carbon = (await client.get("/readyz")).json()["carbon"]
    assert carbon["embodied"] == {
        "kgco2eq": 0.0,
        "lifespan_years": 4.0,
        "basis": energy["embodied_basis"],
    }
    assert carbon["pue"] == 1.0


async def test_sci_and_a_configured_embodied_figure_in_headers_and_body(
    fake: tuple[Any, FakeState], tmp_path: Path
) -> None:
    backend_app, _ = fake
    app = create_app(
        proxy_settings(tmp_path, embodied_kgco2eq=2544.0),
        upstream=HttpxUpstream(30.0, transport=httpx.ASGITransport(app=backend_app)),
        sources=[ConstantSource(100.0, start_s=0.0)],
    )
    async with (
        app.running(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as c,
    ):
        r = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4})
    energy = r.json()["energy"]
    # Alone on the host: charged the whole host for its whole duration.
    te_g, el_s = 2_544_000.0, 4 * 365 * 24 * 3600
    assert energy["embodied_g"] == pytest.approx(te_g * energy["duration_s"] / el_s, rel=1e-6)
    assert energy["embodied_basis"].startswith("2544 kgCO2eq over 4 years, configured")
    assert energy["sci_g"] == pytest.approx(energy["co2eq_g"] + energy["embodied_g"], rel=1e-12)
    assert r.headers["x-sci-grams"] == header_number(energy["sci_g"])
    assert energy["sci_per_token_g"] == pytest.approx(energy["sci_g"] / 4)


async def test_a_kind_without_stream_usage_gets_its_prompt_counted_by_its_tokenizer(
    fake: tuple[Any, FakeState], tmp_path: Path
) -> None:
    backend_app, state = fake
    settings = proxy_settings(
        tmp_path,
        backends=[{"name": "fake", "url": "http://fake-backend", "kind": "llama-cpp-python"}],
    )
    app = create_app(
        settings,
        upstream=HttpxUpstream(30.0, transport=httpx.ASGITransport(app=backend_app)),
        sources=[ConstantSource(100.0, start_s=0.0)],
    )
    chat = {
        "model": "fake-model",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "one two three"}]},
        ],
        "max_tokens": 4,
        "stream": True,
    }
    async with (
        app.running(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as c,
    ):
        r = await c.post("/v1/chat/completions", json=chat, headers={"x-fake-no-usage": "1"})
        energy = sse_payloads(r.text)[-2]["energy"]
        assert energy["tokens_source"] == "proxy; prompt text only"
        assert energy["completion_tokens"] == 4
        assert energy["prompt_tokens"] == 5  # "be brief" + "one two three", by its tokenizer
        assert state.tokenize_calls == 1
        ready = (await c.get("/readyz")).json()
        assert ready["backends"][0]["kind"] == "llama-cpp-python"
