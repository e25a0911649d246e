"""The vLLM stand-in (tests/support/fakes/vllm_api.py) answers in shapes the real clients
read: the `openai` and `anthropic` SDKs parse each answer, streamed or not, and the raw
answers carry the fields vLLM's own source writes. Its switches (gzip, errors, delays),
its CORS preflights and its records are checked here too, so tests built on it can trust
them."""

from __future__ import annotations

import io
import json
import threading
import time
import wave
import zlib
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.support.fakes.vllm_api import VllmApiState, make_vllm_api_backend
from tests.support.servers import ServerThread

ANSWER = "Hello, energy world!"
MODEL = "fake-model"


@pytest.fixture
def server() -> Iterator[tuple[str, VllmApiState]]:
    app, state = make_vllm_api_backend()
    with ServerThread(app) as url:
        yield url, state


@pytest.fixture
def oai(server: tuple[str, VllmApiState]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server[0] + "/v1", api_key="k", max_retries=0) as client:
        yield client


@pytest.fixture
def claude(server: tuple[str, VllmApiState]) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server[0], api_key="k", max_retries=0) as client:
        yield client


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event name or None, data) for each event of an SSE body."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((fields.get("event"), fields["data"]))
    return out


def wav(seconds: float) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * int(16000 * seconds))
    return buf.getvalue()


# --- Responses API ---


def test_responses_create_parses_and_can_be_fetched_again(oai: openai.OpenAI) -> None:
    resp = oai.responses.create(model=MODEL, input="Say hello to me")
    assert resp.id.startswith("resp_") and resp.object == "response"
    assert resp.status == "completed" and resp.output_text == ANSWER
    assert resp.usage is not None
    assert (resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.total_tokens) == (
        4, 5, 9,
    )  # fmt: skip
    assert resp.usage.input_tokens_details.cached_tokens == 0
    assert resp.usage.output_tokens_details.reasoning_tokens == 0
    assert resp.parallel_tool_calls is True and resp.tool_choice == "auto" and resp.tools == []
    assert oai.responses.retrieve(resp.id).output_text == ANSWER
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve("resp_unknown")


def test_responses_cut_short_is_incomplete(oai: openai.OpenAI) -> None:
    resp = oai.responses.create(model=MODEL, input="hi", max_output_tokens=2)
    assert resp.status == "incomplete" and resp.output_text == "Hello,"
    assert resp.incomplete_details is not None
    assert resp.incomplete_details.reason == "max_output_tokens"


def test_responses_stream_events_in_vllm_order(oai: openai.OpenAI) -> None:
    events = list(oai.responses.create(model=MODEL, input="hi there", stream=True))
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", *["response.output_text.delta"] * 5,
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = events[-1]
    assert done.type == "response.completed"
    assert done.response.output_text == ANSWER
    assert done.response.usage is not None and done.response.usage.output_tokens == 5


def test_responses_stream_helper_gives_the_final_response(oai: openai.OpenAI) -> None:
    with oai.responses.stream(model=MODEL, input="hi there") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == ANSWER == final.output_text
    assert final.usage is not None and final.usage.total_tokens == 7


def test_responses_raw_stream_has_named_events_and_no_done(
    server: tuple[str, VllmApiState],
) -> None:
    url, _ = server
    body = {"model": MODEL, "input": "hi", "stream": True}
    text = httpx.post(url + "/v1/responses", json=body).text
    assert "[DONE]" not in text
    events = sse_events(text)
    for name, data in events:
        assert json.loads(data)["type"] == name
    completed = json.loads(events[-1][1])
    assert completed["response"]["status"] == "completed"
    assert completed["response"]["usage"]["total_tokens"] == 6


# --- Anthropic Messages API ---


def test_messages_create_parses(claude: anthropic.Anthropic) -> None:
    msg = claude.messages.create(
        model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "hello there"}]
    )
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].type == "text" and msg.content[0].text == ANSWER
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (2, 5)


def test_messages_stream_parses(claude: anthropic.Anthropic) -> None:
    events = list(
        claude.messages.create(
            model=MODEL, max_tokens=100, stream=True,
            messages=[{"role": "user", "content": "hello there"}],
        )
    )  # fmt: skip
    assert [e.type for e in events] == [
        "message_start", "content_block_start", *["content_block_delta"] * 5,
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    start, delta = events[0], events[-2]
    assert start.type == "message_start" and start.message.usage.input_tokens == 2
    assert delta.type == "message_delta" and delta.delta.stop_reason == "end_turn"
    assert delta.usage.output_tokens == 5 and delta.usage.input_tokens == 2


def test_messages_stream_helper_gives_the_final_message(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hello there"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello, energy"
    assert final.stop_reason == "max_tokens"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (2, 3)


def test_messages_count_tokens(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(
        model=MODEL, system="be brief", messages=[{"role": "user", "content": "a b c"}]
    )
    assert counted.input_tokens == 5


def test_messages_errors_come_in_anthropics_envelope(
    server: tuple[str, VllmApiState], claude: anthropic.Anthropic
) -> None:
    with pytest.raises(anthropic.InternalServerError):
        claude.messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-fake-error": "500"},
        )  # fmt: skip
    body = {"model": MODEL, "max_tokens": 5, "messages": []}
    got = httpx.post(server[0] + "/v1/messages", json=body, headers={"x-fake-error": "400"})
    assert got.status_code == 400
    assert got.json() == {
        "type": "error", "error": {"type": "BadRequestError", "message": "fake backend error"}
    }  # fmt: skip


# --- Audio ---


def test_transcription_parses_and_the_upload_is_recorded(
    server: tuple[str, VllmApiState], oai: openai.OpenAI
) -> None:
    audio = wav(1.5)
    got = oai.audio.transcriptions.create(file=("a.wav", audio), model=MODEL)
    assert got.text == ANSWER
    assert got.usage is not None and got.usage.type == "duration"
    assert got.usage.seconds == 2  # 1.5 s, rounded up as vLLM does
    upload = server[1].uploads[-1]
    assert upload["file_size"] == len(audio) and upload["filename"] == "a.wav"
    assert [p["name"] for p in upload["parts"]] == ["model", "file"]
    assert upload["chunked"] is False and upload["content_length"] is not None


def test_transcription_text_format_answers_json_as_vllm(
    server: tuple[str, VllmApiState], oai: openai.OpenAI
) -> None:
    raw = oai.audio.transcriptions.create(
        file=("a.wav", wav(1)), model=MODEL, response_format="text"
    )
    assert json.loads(raw)["text"] == ANSWER
    server[1].plain_text_transcripts = True
    plain = oai.audio.transcriptions.create(
        file=("a.wav", wav(1)), model=MODEL, response_format="text"
    )
    assert plain == ANSWER


def test_transcription_stream_and_translation(server: tuple[str, VllmApiState]) -> None:
    url, _ = server
    files = {"file": ("a.wav", wav(1), "audio/wav")}
    form = {"model": MODEL, "stream": "true", "stream_include_usage": "true"}
    text = httpx.post(url + "/v1/audio/transcriptions", data=form, files=files).text
    events = [data for _, data in sse_events(text)]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(d) for d in events[:-1]]
    assert all(c["object"] == "transcription.chunk" for c in chunks)
    assert chunks[0]["id"].startswith("transcribe-")
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks[:-1]) == ANSWER
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 1, "total_tokens": 6, "completion_tokens": 5}
    translated = httpx.post(url + "/v1/audio/translations", data={"model": MODEL}, files=files)
    assert translated.json() == {"text": ANSWER}  # no usage on a translation


def test_a_chunked_upload_is_recorded_as_it_arrived(server: tuple[str, VllmApiState]) -> None:
    url, state = server
    boundary = "fakeboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"'
        "\r\nContent-Type: audio/wav\r\n\r\n"
    ).encode()
    audio = wav(1)
    tail = (
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{MODEL}'
        f"\r\n--{boundary}--\r\n"
    ).encode()

    def body() -> Iterator[bytes]:
        for piece in (head, audio[:16000], audio[16000:], tail):
            yield piece
            time.sleep(0.05)

    got = httpx.post(
        url + "/v1/audio/transcriptions", content=body(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )  # fmt: skip
    assert got.status_code == 200, got.text
    upload = state.uploads[-1]
    assert upload["chunked"] is True and upload["content_length"] is None
    assert [p["name"] for p in upload["parts"]] == ["file", "model"]
    assert upload["file_size"] == len(audio) and upload["body_chunks"] >= 2
    assert upload["parts"][0]["chunk"] < upload["parts"][1]["chunk"]
    assert state.requests[-1]["body_size"] == len(head) + len(audio) + len(tail)


# --- Pooling models, the tokenizer, probes ---


def test_pooling_family_shapes(server: tuple[str, VllmApiState]) -> None:
    url, _ = server
    with httpx.Client(base_url=url) as c:
        docs = ["the energy of a request", "cats"]
        for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
            got = c.post(path, json={"model": MODEL, "query": "energy", "documents": docs}).json()
            assert got["id"].startswith("rerank-") and got["model"] == MODEL
            assert got["usage"] == {"prompt_tokens": 8, "total_tokens": 8}
            assert [r["index"] for r in got["results"]] == [0, 1]
            assert got["results"][0]["document"]["text"] == docs[0]
            assert got["results"][0]["relevance_score"] > got["results"][1]["relevance_score"]
        top = c.post("/rerank", json={"query": "energy", "documents": docs, "top_n": 1}).json()
        assert len(top["results"]) == 1
        for path in ("/score", "/v1/score"):
            got = c.post(path, json={"model": MODEL, "text_1": "a b", "text_2": ["a", "c"]}).json()
            assert got["object"] == "list" and got["model"] == MODEL
            assert [(d["index"], d["object"]) for d in got["data"]] == [(0, "score"), (1, "score")]
            assert got["usage"]["prompt_tokens"] == 6 and got["usage"]["completion_tokens"] == 0
        pool = c.post("/pooling", json={"model": MODEL, "input": ["a b", "c"]}).json()
        assert [d["object"] for d in pool["data"]] == ["pooling", "pooling"]
        assert [d["index"] for d in pool["data"]] == [0, 1]
        assert pool["usage"]["total_tokens"] == 3
        classify = c.post("/classify", json={"model": MODEL, "input": "a b"}).json()
        assert set(classify["data"][0]) == {"index", "label", "probs", "num_classes"}
        embed = c.post("/v2/embed", json={"model": MODEL, "texts": ["a b", "c"]}).json()
        assert len(embed["embeddings"]["float"]) == 2 and embed["texts"] == ["a b", "c"]
        assert embed["meta"]["billed_units"]["input_tokens"] == 3


def test_passthrough_endpoints(server: tuple[str, VllmApiState]) -> None:
    url, _ = server
    with httpx.Client(base_url=url) as c:
        tok = c.post("/tokenize", json={"model": MODEL, "prompt": "a b c"}).json()
        assert tok["count"] == 3 and tok["tokens"] == [0, 1, 2] and tok["max_model_len"] > 0
        assert c.post("/detokenize", json={"tokens": [1, 2]}).json() == {"prompt": "t1 t2"}
        health = c.get("/health")
        assert health.status_code == 200 and health.content == b""
        assert c.get("/version").json() == {"version": "0.32.0"}
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [MODEL]
        assert c.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
        assert c.get("/v1/models/nope").status_code == 404
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        got = c.post("/invocations", json=chat).json()
        assert got["object"] == "chat.completion"
        assert got["choices"][0]["message"]["content"] == ANSWER
        assert c.post("/v1/responses", json={"model": "other", "input": "x"}).status_code == 404


# --- Switches, CORS, records, metrics ---


def test_gzip_even_when_identity_is_asked_for(server: tuple[str, VllmApiState]) -> None:
    url, _ = server
    headers = {"x-fake-gzip": "1", "accept-encoding": "identity"}
    with httpx.Client(base_url=url) as c:
        got = c.post("/pooling", json={"input": "a"}, headers=headers)
        assert got.headers["content-encoding"] == "gzip"
        assert got.json()["data"][0]["object"] == "pooling"  # httpx inflated it
        slow = {**headers, "x-fake-token-delay-s": "0.02"}
        body = {"input": "hi", "stream": True}
        with c.stream("POST", "/v1/responses", json=body, headers=slow) as stream:
            assert stream.headers["content-encoding"] == "gzip"
            inflate = zlib.decompressobj(wbits=31)
            pieces = [inflate.decompress(raw) for raw in stream.iter_raw()]
    # Flushed per event: every piece that arrives inflates to whole events at once.
    assert all(p.endswith(b"\n\n") for p in pieces if p) and inflate.eof
    names = [name for name, _ in sse_events(b"".join(pieces).decode())]
    assert names[0] == "response.created" and names[-1] == "response.completed"


def test_errors_and_method_not_allowed(
    server: tuple[str, VllmApiState], oai: openai.OpenAI
) -> None:
    with pytest.raises(openai.BadRequestError):
        oai.responses.create(model=MODEL, input="x", extra_headers={"x-fake-error": "400"})
    with pytest.raises(openai.InternalServerError) as caught:
        oai.responses.create(model=MODEL, input="x", extra_headers={"x-fake-error": "500"})
    assert caught.value.body == {
        "message": "fake backend error", "type": "InternalServerError", "param": None,
        "code": 500,
    }  # fmt: skip
    assert httpx.get(server[0] + "/v1/responses").status_code == 405
    assert httpx.post(server[0] + "/rerank", content=b"not json").status_code == 400


def test_cors_preflight_echoes_the_origin(server: tuple[str, VllmApiState]) -> None:
    url, state = server
    got = httpx.options(
        url + "/v1/messages",
        headers={"origin": "http://app.example", "access-control-request-method": "POST",
                 "access-control-request-headers": "x-api-key,content-type"},
    )  # fmt: skip
    assert got.status_code == 200
    assert got.headers["access-control-allow-origin"] == "http://app.example"
    assert "POST" in got.headers["access-control-allow-methods"]
    assert "x-api-key" in got.headers["access-control-allow-headers"]
    assert state.requests[-1]["method"] == "OPTIONS"


def test_every_request_is_recorded(server: tuple[str, VllmApiState]) -> None:
    url, state = server
    body = json.dumps({"model": MODEL, "input": "a b"}).encode()
    httpx.post(url + "/v1/responses?trace=1", content=body, headers={"x-caller": "t"})
    entry = state.requests[-1]
    assert (entry["method"], entry["path"], entry["query"]) == ("POST", "/v1/responses", "trace=1")
    assert entry["headers"]["x-caller"] == "t" and entry["body_size"] == len(body)
    assert entry["chunked"] is False and entry["body"]["input"] == "a b"


def test_metrics_count_running_requests_and_tokens(server: tuple[str, VllmApiState]) -> None:
    url, state = server
    state.bypass_running = 2
    label = f'{{model_name="{MODEL}"}}'
    seen: dict[str, Any] = {}
    body = {"model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": "a"}],
            "stream": True}  # fmt: skip
    with (
        httpx.Client(base_url=url) as c,
        c.stream(
            "POST", "/v1/messages", json=body, headers={"x-fake-token-delay-s": "0.1"}
        ) as stream,
    ):
        lines = stream.iter_lines()
        next(lines)
        probe = threading.Thread(target=lambda: seen.update(text=c.get("/metrics").text))
        probe.start()
        probe.join()
        for _ in lines:
            pass
    assert f"vllm:num_requests_running{label} 3.0" in seen["text"]
    after = httpx.get(url + "/metrics").text
    assert f"vllm:num_requests_running{label} 2.0" in after
    assert f"vllm:num_requests_waiting{label} 0.0" in after
    assert f"vllm:prompt_tokens_total{label} 1.0" in after
    assert f"vllm:generation_tokens_total{label} 5.0" in after
