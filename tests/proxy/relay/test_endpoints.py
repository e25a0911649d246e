"""Every endpoint a vLLM serves, through the proxy on a real socket, with the real `openai`
and `anthropic` SDKs where a user would use them: the metered ones answer with their
energy where each SDK's caller can read it, the rest pass through untouched."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import warnings
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from metering.accounting.report import header_number
from tests.conftest import serve_proxy
from tests.support.fakes.vllm_api import VllmApiState, make_vllm_api_backend
from tests.support.polling import wait_for
from tests.support.servers import ServerThread

MODEL = "fake-model"


@pytest.fixture
def stand_in() -> Iterator[tuple[str, VllmApiState]]:
    app, state = make_vllm_api_backend()
    with ServerThread(app) as url:
        yield url, state


@pytest.fixture
def proxy_url(stand_in: tuple[str, VllmApiState], tmp_path: Path) -> Iterator[str]:
    with serve_proxy(tmp_path, stand_in[0]) as url:
        yield url


@pytest.fixture
def oai(proxy_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def claude(proxy_url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy_url, api_key="unused", max_retries=0)


def _energy_of(obj: Any) -> dict[str, Any]:
    """The `energy` object an SDK model kept as an extra field."""
    extra = obj.model_extra or {}
    energy = extra.get("energy")
    assert isinstance(energy, dict), f"no energy on {type(obj).__name__}: {sorted(extra)}"
    return energy


def _assert_metered(energy: dict[str, Any], endpoint: str) -> None:
    assert energy["joules"] > 0.0
    assert energy["endpoint"] == endpoint
    assert energy["request_id"].startswith("req-")


def _stored(proxy_url: str, request_id: str) -> dict[str, Any]:
    r = httpx.get(f"{proxy_url}/v1/energy/requests/{request_id}")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


# --- the Responses API ---------------------------------------------------------------------


def test_responses_create_carries_energy_beside_usage(oai: openai.OpenAI, proxy_url: str) -> None:
    resp = oai.responses.create(model=MODEL, input="Say hello to the energy world")
    assert resp.output_text
    energy = _energy_of(resp)
    _assert_metered(energy, "responses")
    assert resp.usage is not None
    assert energy["prompt_tokens"] == resp.usage.input_tokens
    assert energy["completion_tokens"] == resp.usage.output_tokens
    assert energy["tokens_source"] == "backend"
    assert _stored(proxy_url, energy["request_id"])["endpoint"] == "responses"


def test_responses_headers_through_the_raw_response(oai: openai.OpenAI) -> None:
    raw = oai.responses.with_raw_response.create(model=MODEL, input="hello")
    assert raw.headers["x-energy-joules"] == header_number(_energy_of(raw.parse())["joules"])


def test_responses_stream_puts_energy_in_the_completed_response(oai: openai.OpenAI) -> None:
    events = list(oai.responses.create(model=MODEL, input="hello there", stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert "response.output_text.delta" in types
    completed = events[-1]
    energy = _energy_of(completed.response)
    _assert_metered(energy, "responses")
    assert completed.response.usage is not None
    assert energy["completion_tokens"] == completed.response.usage.output_tokens


def test_responses_stream_helper_final_response_has_energy(oai: openai.OpenAI) -> None:
    with oai.responses.stream(model=MODEL, input="hello there") as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.output_text == text
    _assert_metered(_energy_of(final), "responses")


def test_a_stored_response_is_passed_through(oai: openai.OpenAI) -> None:
    resp = oai.responses.create(model=MODEL, input="remember me")
    again = oai.responses.retrieve(resp.id)
    assert again.id == resp.id and again.output_text == resp.output_text


# --- Anthropic's Messages API ----------------------------------------------------------------


def test_messages_create_carries_energy(claude: anthropic.Anthropic, proxy_url: str) -> None:
    msg = claude.messages.create(
        model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hello there"}]
    )
    assert msg.content and msg.content[0].type == "text"
    energy = _energy_of(msg)
    _assert_metered(energy, "messages")
    assert energy["prompt_tokens"] == msg.usage.input_tokens
    assert energy["completion_tokens"] == msg.usage.output_tokens
    assert _stored(proxy_url, energy["request_id"])["endpoint"] == "messages"


def test_messages_stream_puts_energy_in_message_delta(claude: anthropic.Anthropic) -> None:
    events = list(
        claude.messages.create(
            model=MODEL,
            max_tokens=16,
            messages=[{"role": "user", "content": "hello there"}],
            stream=True,
        )
    )
    types = [e.type for e in events]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    delta = events[-2]
    energy = _energy_of(delta)
    _assert_metered(energy, "messages")
    assert energy["completion_tokens"] == delta.usage.output_tokens


def test_messages_stream_helper_keeps_the_message_and_shows_energy(
    claude: anthropic.Anthropic,
) -> None:
    with claude.messages.stream(
        model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hello there"}]
    ) as stream:
        deltas = [e for e in stream if e.type == "message_delta"]
        final = stream.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text
    assert final.usage.output_tokens > 0
    assert len(deltas) == 1
    _assert_metered(_energy_of(deltas[0]), "messages")


def test_count_tokens_is_passed_through(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": "one two three"}]
    )
    assert counted.input_tokens > 0


# --- audio -----------------------------------------------------------------------------------


def _wav(seconds: float = 1.0, rate: int = 16_000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00\x00" * int(seconds * rate))
    return buf.getvalue()


def test_transcription_through_the_sdk_carries_energy(
    oai: openai.OpenAI, stand_in: tuple[str, VllmApiState]
) -> None:
    audio = _wav(1.0)
    raw = oai.audio.transcriptions.with_raw_response.create(
        model=MODEL, file=("speech.wav", audio, "audio/wav")
    )
    result = raw.parse()
    assert result.text
    energy = _energy_of(result)
    _assert_metered(energy, "audio")
    assert raw.headers["x-energy-joules"] == header_number(energy["joules"])
    upload = stand_in[1].uploads[-1]
    assert any(p.get("size") == len(audio) for p in upload["parts"]), upload


def test_translation_is_metered(oai: openai.OpenAI) -> None:
    with warnings.catch_warnings():  # the SDK marks translations deprecated; vLLM serves them
        warnings.simplefilter("ignore", DeprecationWarning)
        result = oai.audio.translations.create(
            model=MODEL, file=("s.wav", _wav(0.5), "audio/wav")
        )
    _assert_metered(_energy_of(result), "audio")


def test_an_upload_reaches_the_backend_before_it_has_all_arrived(
    proxy_url: str, stand_in: tuple[str, VllmApiState]
) -> None:
    """The proxy streams a multipart upload: the backend has its head while the client
    still holds back the rest (a proxy that buffered it whole would show it nothing)."""
    state = stand_in[1]
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{MODEL}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    audio = _wav(2.0)
    tail = f"\r\n--{boundary}--\r\n".encode()
    seen_early = threading.Event()
    before = len(state.requests)

    def body() -> Iterator[bytes]:
        yield head + audio[:1000]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if len(state.requests) > before and state.requests[-1]["body_size"] > 0:
                seen_early.set()
                break
            time.sleep(0.01)
        yield audio[1000:] + tail

    r = httpx.post(
        f"{proxy_url}/v1/audio/transcriptions",
        content=body(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert seen_early.is_set()
    assert state.requests[-1]["body_size"] == len(head) + len(audio) + len(tail)
    assert r.json()["energy"]["endpoint"] == "audio"


# --- pooling APIs ----------------------------------------------------------------------------

POOLING_CALLS = [
    ("/v1/rerank", {"model": MODEL, "query": "energy", "documents": ["energy use", "cats"]}),
    ("/rerank", {"query": "energy", "documents": ["energy use", "cats"]}),
    ("/v2/rerank", {"model": MODEL, "query": "energy", "documents": ["energy", "cats"]}),
    ("/score", {"model": MODEL, "text_1": "energy", "text_2": ["energy use", "cats"]}),
    ("/pooling", {"model": MODEL, "input": "pool this text"}),
    ("/classify", {"model": MODEL, "input": ["classify this", "and this"]}),
    ("/v2/embed", {"model": MODEL, "texts": ["embed me"], "input_type": "search_document"}),
]
KIND_OF = {"/v1/rerank": "rerank", "/rerank": "rerank", "/v2/rerank": "rerank",
           "/score": "score", "/pooling": "pooling", "/classify": "pooling",
           "/v2/embed": "embeddings"}  # fmt: skip


@pytest.mark.parametrize(("path", "payload"), POOLING_CALLS, ids=[p for p, _ in POOLING_CALLS])
def test_pooling_apis_are_metered(
    proxy_url: str, stand_in: tuple[str, VllmApiState], path: str, payload: dict[str, Any]
) -> None:
    direct = httpx.post(f"{stand_in[0]}{path}", json=payload)
    r = httpx.post(f"{proxy_url}{path}", json=payload)
    assert r.status_code == direct.status_code == 200, r.text
    doc = r.json()
    energy = doc.pop("energy")
    _assert_metered(energy, KIND_OF[path])
    assert r.headers["x-energy-joules"] == header_number(energy["joules"])
    assert set(doc) == set(direct.json())  # the backend's own answer, the energy beside it
    usage = doc.get("usage") or {}
    expected = usage.get("prompt_tokens", usage.get("total_tokens"))
    if expected is not None:
        assert energy["prompt_tokens"] == expected


# --- passed through ---------------------------------------------------------------------------


def test_utility_paths_answer_as_the_backend_does(
    proxy_url: str, stand_in: tuple[str, VllmApiState]
) -> None:
    for method, path, payload in [
        ("POST", "/tokenize", {"model": MODEL, "prompt": "one two three"}),
        ("POST", "/detokenize", {"model": MODEL, "tokens": [1, 2, 3]}),
        ("GET", "/health", None),
        ("GET", "/version", None),
    ]:
        direct = httpx.request(method, f"{stand_in[0]}{path}", json=payload)
        r = httpx.request(method, f"{proxy_url}{path}", json=payload)
        assert (r.status_code, r.content) == (direct.status_code, direct.content), path
        assert "x-energy-joules" not in r.headers
    # A model card has fresh ids on each call: the same card, not the same bytes.
    r = httpx.get(f"{proxy_url}/v1/models/{MODEL}")
    assert r.status_code == 200 and r.json()["id"] == MODEL and r.json()["owned_by"] == "vllm"


def test_admin_paths_pass_only_when_configured(
    stand_in: tuple[str, VllmApiState], tmp_path: Path
) -> None:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    with serve_proxy(tmp_path, stand_in[0]) as url:
        r = httpx.post(f"{url}/invocations", json=chat)
        assert r.status_code == 404 and "--passthrough" in r.json()["error"]["message"]
        assert httpx.post(f"{url}/v1/load_lora_adapter", json={}).status_code == 404
    with serve_proxy(tmp_path / "b", stand_in[0], passthrough=["/invocations"]) as url:
        r = httpx.post(f"{url}/invocations", json=chat)
        assert r.status_code == 200 and r.json()["choices"]


def test_query_string_reaches_the_backend(
    proxy_url: str, stand_in: tuple[str, VllmApiState]
) -> None:
    r = httpx.post(
        f"{proxy_url}/v1/responses?api-version=2024-06-01", json={"model": MODEL, "input": "hi"}
    )
    assert r.status_code == 200
    assert stand_in[1].requests[-1]["query"] == "api-version=2024-06-01"
    httpx.get(f"{proxy_url}/version?verbose=1")
    assert stand_in[1].requests[-1]["query"] == "verbose=1"


def test_cors_preflight_is_the_backends_answer(
    proxy_url: str, stand_in: tuple[str, VllmApiState]
) -> None:
    headers = {
        "origin": "https://app.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type, authorization",
    }
    for path in ("/v1/chat/completions", "/v1/responses", "/tokenize"):
        r = httpx.options(f"{proxy_url}{path}", headers=headers)
        assert r.status_code == 200, (path, r.text)
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert stand_in[1].requests[-1]["method"] == "OPTIONS"


def test_wrong_method_on_a_metered_path_is_405(proxy_url: str) -> None:
    r = httpx.get(f"{proxy_url}/v1/responses")
    assert r.status_code == 405 and r.headers["allow"] == "POST, OPTIONS"
    assert r.json()["error"]["code"] == "method_not_allowed"


# --- compressed answers and failures ---------------------------------------------------------


def test_a_gzip_answer_is_decoded_and_metered(proxy_url: str) -> None:
    r = httpx.post(
        f"{proxy_url}/v1/responses",
        json={"model": MODEL, "input": "hello"},
        headers={"x-fake-gzip": "1", "accept-encoding": "identity"},
    )
    assert r.status_code == 200
    assert "content-encoding" not in r.headers
    doc = r.json()
    assert doc["object"] == "response" and doc["energy"]["completion_tokens"] > 0


def test_a_gzip_stream_is_decoded_event_by_event(proxy_url: str) -> None:
    with httpx.stream(
        "POST",
        f"{proxy_url}/v1/responses",
        json={"model": MODEL, "input": "hello", "stream": True},
        headers={"x-fake-gzip": "1", "accept-encoding": "identity"},
    ) as r:
        assert "content-encoding" not in r.headers
        text = r.read().decode()
    datas = [json.loads(ln[6:]) for ln in text.splitlines() if ln.startswith("data: ")]
    assert datas[-1]["type"] == "response.completed"
    assert datas[-1]["response"]["energy"]["joules"] > 0


def test_a_failed_answer_tells_its_energy_and_is_stored_with_its_status(
    proxy_url: str, stand_in: tuple[str, VllmApiState]
) -> None:
    payload = {"model": MODEL, "query": "q", "documents": ["d"]}
    direct = httpx.post(f"{stand_in[0]}/v1/rerank", json=payload, headers={"x-fake-error": "400"})
    r = httpx.post(f"{proxy_url}/v1/rerank", json=payload, headers={"x-fake-error": "400"})
    assert r.status_code == 400 and r.content == direct.content
    assert float(r.headers["x-energy-joules"]) > 0
    assert wait_for(
        lambda: httpx.get(
            f"{proxy_url}/v1/energy/requests/{r.headers['x-energy-request-id']}"
        ).status_code
        == 200
    )
    record = _stored(proxy_url, r.headers["x-energy-request-id"])
    assert record["endpoint"] == "rerank"
    assert header_number(record["joules"]) == r.headers["x-energy-joules"]


def _raw_request(proxy_url: str, head: str) -> bytes:
    """One request written as is (clients normalise dot segments before sending)."""
    host, port = proxy_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode())
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def test_dot_segments_cannot_reach_an_admin_path(
    proxy_url: str, stand_in: tuple[str, VllmApiState]
) -> None:
    before = len(stand_in[1].requests)
    answer = _raw_request(
        proxy_url,
        "POST /v1/../invocations HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        "content-length: 2\r\nconnection: close\r\n\r\n{}",
    )
    assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
    assert not any(r["path"] == "/invocations" for r in stand_in[1].requests[before:])


def test_an_encoded_question_mark_stays_in_the_path(
    proxy_url: str, stand_in: tuple[str, VllmApiState]
) -> None:
    r = httpx.get(f"{proxy_url}/v1/responses/resp_a%3Fb")
    (seen,) = [q for q in stand_in[1].requests if q["path"].startswith("/v1/responses/")]
    assert (seen["path"], seen["query"]) == ("/v1/responses/resp_a?b", "")
    assert r.status_code == 404  # the backend's own answer: no such response
