"""The real CPU vLLM's other APIs through `energy-proxy serve`: OpenAI's Responses API and
Anthropic's Messages API (streamed and not), read with the real SDKs, and a utility path
passed through. Run alone with `pytest -m vllm`; shares the session's vLLM and proxy."""

from __future__ import annotations

import threading
from typing import Any

import anthropic
import httpx
import pytest
from openai import OpenAI

from tests.integration.conftest import VLLM_MODEL, Child, log_tail
from tests.integration.test_vllm import EXACT, LONG_STREAM_TOKENS, SETTLE_S, metric_sum, settle

pytestmark = pytest.mark.vllm

MAX_TOKENS = 8


def energy_of(obj: Any) -> dict[str, Any]:
    energy = (obj.model_extra or {}).get("energy")
    assert isinstance(energy, dict), f"no energy object on {type(obj).__name__}"
    return energy


@pytest.fixture(scope="module")
def claude(proxy: Child) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0, timeout=300)


def test_responses_create_has_vllm_usage_and_energy(client: OpenAI) -> None:
    resp = client.responses.create(
        model=VLLM_MODEL, input="Name a colour.", max_output_tokens=MAX_TOKENS
    )
    energy = energy_of(resp)
    assert resp.usage is not None
    print(f"responses: usage {resp.usage.input_tokens}/{resp.usage.output_tokens}, {energy}")
    assert energy["endpoint"] == "responses" and energy["joules"] > 0
    assert energy["prompt_tokens"] == resp.usage.input_tokens
    assert energy["completion_tokens"] == resp.usage.output_tokens
    assert energy["tokens_source"] == "backend"


def test_responses_stream_final_response_has_energy(client: OpenAI) -> None:
    with client.responses.stream(
        model=VLLM_MODEL, input="Name a colour.", max_output_tokens=MAX_TOKENS
    ) as stream:
        types = [e.type for e in stream]
        final = stream.get_final_response()
    assert types[-1] == "response.completed"
    energy = energy_of(final)
    assert final.usage is not None
    assert energy["endpoint"] == "responses" and energy["joules"] > 0
    assert energy["completion_tokens"] == final.usage.output_tokens


def test_messages_create_and_stream_have_energy(claude: anthropic.Anthropic) -> None:
    ask: Any = {"model": VLLM_MODEL, "max_tokens": MAX_TOKENS,
                "messages": [{"role": "user", "content": "Name a colour."}]}  # fmt: skip
    msg = claude.messages.create(**ask)
    energy = energy_of(msg)
    print(f"messages: usage {msg.usage.input_tokens}/{msg.usage.output_tokens}, {energy}")
    assert energy["endpoint"] == "messages" and energy["joules"] > 0
    assert energy["prompt_tokens"] == msg.usage.input_tokens
    assert energy["completion_tokens"] == msg.usage.output_tokens
    with claude.messages.stream(**ask) as stream:
        deltas = [e for e in stream if e.type == "message_delta"]
        final = stream.get_final_message()
    assert len(deltas) == 1
    streamed = energy_of(deltas[0])
    assert streamed["endpoint"] == "messages"
    assert streamed["completion_tokens"] == final.usage.output_tokens


def test_tokenize_passes_through(proxy: Child, vllm_server: Child) -> None:
    body = {"model": VLLM_MODEL, "prompt": "Name a colour."}
    direct = httpx.post(vllm_server.url + "/tokenize", json=body, timeout=60)
    through = httpx.post(proxy.url + "/tokenize", json=body, timeout=60)
    assert through.status_code == direct.status_code == 200
    assert through.json()["tokens"] == direct.json()["tokens"]


def _watts(energy: dict[str, Any]) -> float:
    return float(energy["joules"]) / float(energy["duration_s"])


def _request_gauges(vllm_url: str) -> list[str]:
    """vLLM's own running and waiting counts, read straight from it (for a failure's
    message)."""
    text = httpx.get(vllm_url + "/metrics", timeout=30).text
    return [line for line in text.splitlines() if line.startswith("vllm:num_requests")]


def test_work_sent_around_the_proxy_is_not_charged_to_metered_requests(
    client: OpenAI, proxy: Child, vllm_server: Child
) -> None:
    """A stream sent straight to vLLM runs beside a metered request: the metered one is
    told its share of the (constant 100 W) power, not all of it, and says it shared."""
    # Long enough (48 tokens, a few seconds on a CPU) that the moment it takes the proxy
    # to read vLLM's gauges after it opens (at once, then within 0.25 s) is a small part.
    ask: Any = {"model": VLLM_MODEL, "prompt": "Count to ten.", "max_tokens": 48,
                "temperature": 0, "extra_body": EXACT}  # fmt: skip
    alone = client.completions.create(**ask)
    alone_energy = (alone.model_extra or {})["energy"]
    assert alone_energy["shared_with_untracked"] is False
    stop, started = threading.Event(), threading.Event()

    def around_the_proxy() -> None:
        body = {"model": VLLM_MODEL, "prompt": "Once upon a time", "stream": True,
                "max_tokens": LONG_STREAM_TOKENS, **EXACT}  # fmt: skip
        with httpx.stream("POST", vllm_server.url + "/v1/completions", json=body,
                          timeout=300) as r:  # fmt: skip
            for _ in r.iter_lines():
                started.set()
                if stop.is_set():
                    break  # hang up: vLLM stops it

    worker = threading.Thread(target=around_the_proxy)
    worker.start()
    try:
        assert started.wait(SETTLE_S), "the direct stream never started"
        seen = settle(
            lambda: metric_sum(proxy.url, "energy_proxy_backend_inflight_requests", backend="vllm"),
            lambda v: v is not None and v >= 1,
        )
        assert seen is not None and seen >= 1, (
            "the proxy never read vLLM's running count",
            worker.is_alive(),  # the direct stream still running?
            _request_gauges(vllm_server.url),
            log_tail(proxy.log_path, 30),
        )
        shared = client.completions.create(**ask)
    finally:
        stop.set()
        worker.join()
    energy = (shared.model_extra or {})["energy"]
    print(f"alone {_watts(alone_energy):.1f} W, beside untracked work {_watts(energy):.1f} W; "
          f"{energy}")  # fmt: skip
    assert _watts(alone_energy) > 95.0  # alone it is told all of the 100 W
    assert energy["shared_with_untracked"] is True
    assert _watts(energy) < 80.0  # an equal share with the untracked stream is ~50 W
