"""A backend's own per-request timings: read off the answer (vLLM's per-request metrics,
llama.cpp's `timings`), never trusted past what they can be, forwarded untouched, and
named in the energy object's `attribution_basis`."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from metering.accounting.report import Timings
from proxy.relay.exchange import timings_from_answer

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "say hello to me"}]}


def test_vllm_and_llamacpp_timings_are_read() -> None:
    vllm = {
        "metrics": {
            "queue_time_ms": 12.5,
            "time_to_first_token_ms": 40,
            "generation_time_ms": 900.0,
            "mean_itl_ms": 3.0,
        }
    }
    assert timings_from_answer(vllm) == Timings(0.0125, 0.04, 0.9)
    llamacpp = {"timings": {"prompt_n": 5, "prompt_ms": 8.0, "predicted_n": 9, "predicted_ms": 70}}
    assert timings_from_answer(llamacpp) == Timings(None, 0.008, 0.07)


@pytest.mark.parametrize(
    "doc",
    [
        None,
        [],
        {},
        {"usage": {"prompt_tokens": 3}},
        {"metrics": None},
        {"metrics": "fast"},
        {"metrics": {}},
        {"metrics": {"queue_time_ms": -1, "time_to_first_token_ms": "40"}},
        {"metrics": {"generation_time_ms": float("nan")}},
        {"metrics": {"generation_time_ms": float("inf")}},
        {"metrics": {"generation_time_ms": True}},
        {"metrics": {"generation_time_ms": 1e300}},
        {"timings": {"prompt_ms": [1], "predicted_ms": {"a": 1}}},
    ],
)
def test_no_timings_or_impossible_ones_are_none(doc: Any) -> None:
    assert timings_from_answer(doc) is None


def test_a_partly_impossible_report_keeps_the_possible_phases() -> None:
    doc = {
        "metrics": {"queue_time_ms": -5, "time_to_first_token_ms": 30, "generation_time_ms": 1e12}
    }
    assert timings_from_answer(doc) == Timings(None, 0.03, None)


def sse(text: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[6:])
        for line in text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


async def test_timings_on_a_stream_are_used_and_forwarded(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={**CHAT, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}},
        headers={"x-fake-timings": "vllm:1,20,300"},
    )
    events = sse(r.text)
    energy = events[-1]["energy"]
    assert energy["attribution_basis"].endswith("; timings backend")
    usage_chunk = next(e for e in events if e.get("usage"))
    assert usage_chunk["metrics"]["generation_time_ms"] == 300  # the client's, untouched


async def test_timings_on_a_json_answer_are_used(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={**CHAT, "max_tokens": 3},
        headers={"x-fake-timings": "llamacpp:0,8,70"},
    )
    body = r.json()
    assert body["timings"]["predicted_ms"] == 70
    assert body["energy"]["attribution_basis"].endswith("; timings backend")
    plain = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})
    assert plain.json()["energy"]["attribution_basis"].endswith("; timings proxy")
