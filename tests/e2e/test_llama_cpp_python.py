"""End to end over real sockets: the real `openai` client -> `energy-proxy serve` (a child
process, started through its command line) -> llama-cpp-python's server with SmolLM2-135M.

Run alone with `pytest -m e2e`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from backends.local.launch import (
    BUNDLED_MODEL_ALIAS,
    ChildServer,
    llama_cpp_python_server,
    proxy_server,
)
from metering.accounting.report import header_number

pytestmark = pytest.mark.e2e

PROMPT = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChildServer]:
    logs = tmp_path_factory.mktemp("backend")
    with llama_cpp_python_server(log_path=logs / "backend.log") as server:
        yield server


@pytest.fixture(scope="module")
def proxy(backend: ChildServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChildServer]:
    logs: Path = tmp_path_factory.mktemp("proxy")
    with proxy_server(
        f"local={backend.url}",
        extra_args=[
            "--power-source",
            "cpu-estimate",
            "--carbon-intensity",
            "300",
            "--db",
            str(logs / "requests.db"),
        ],
        log_path=logs / "proxy.log",
    ) as server:
        yield server


@pytest.fixture(scope="module")
def client(proxy: ChildServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def metric_samples(url: str, name: str) -> list[tuple[dict[str, str], float]]:
    text = httpx.get(url + "/metrics").text
    return [
        (s.labels, s.value)
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name
    ]


def test_models_listed_through_proxy(client: OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [BUNDLED_MODEL_ALIAS]


def test_non_streaming_answer_carries_energy(client: OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=BUNDLED_MODEL_ALIAS, messages=PROMPT, max_tokens=12, temperature=0
    )
    completion = raw.parse()
    energy = (completion.model_extra or {})["energy"]
    assert completion.choices[0].message.content
    assert energy["joules"] > 0
    assert raw.headers["x-energy-joules"] == header_number(energy["joules"])
    assert raw.headers["x-energy-method"] == "cpu-estimate"
    assert float(raw.headers["x-carbon-intensity"]) == 300.0
    co2eq_g = energy["joules"] / 3.6e6 * 300
    assert float(raw.headers["x-co2eq-grams"]) == pytest.approx(co2eq_g, rel=5e-4)
    assert completion.usage is not None
    assert energy["completion_tokens"] == completion.usage.completion_tokens > 0
    assert energy["prompt_tokens"] == completion.usage.prompt_tokens > 0
    assert energy["tokens_source"] == "backend"
    assert energy["cpu_joules"] == energy["joules"]


def test_streaming_tokens_counted_by_proxy_match_model_output(client: OpenAI) -> None:
    reference = client.chat.completions.create(
        model=BUNDLED_MODEL_ALIAS, messages=PROMPT, max_tokens=16, temperature=0, seed=7
    )
    assert reference.usage is not None
    pieces: list[str] = []
    told: list[tuple[bool, dict[str, object]]] = []  # (with choices, the energy)
    for chunk in client.chat.completions.create(
        model=BUNDLED_MODEL_ALIAS,
        messages=PROMPT,
        max_tokens=16,
        temperature=0,
        seed=7,
        stream=True,
    ):
        extra = chunk.model_extra or {}
        if "energy" in extra:
            told.append((bool(chunk.choices), extra["energy"]))
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
    # Only on the final chunk (no choices): with no usage from the backend, the prompt is
    # counted by its tokenizer after the stream, and the chunk that ended the answer does
    # not wait for that (a backend that sends usage has it there too: tests/integration).
    assert [with_choices for with_choices, _ in told] == [False]
    energy = told[-1][1]
    # llama-cpp-python sends no usage in streams: the proxy counted the completion tokens
    # itself, and its /extras/tokenize the prompt's text, plus the chat template's tokens
    # learnt from the non-streamed answer above: the same count as the backend's own.
    assert energy["tokens_source"] == "proxy"
    assert "".join(pieces) == reference.choices[0].message.content
    assert energy["completion_tokens"] == reference.usage.completion_tokens
    assert energy["prompt_tokens"] == reference.usage.prompt_tokens
    assert isinstance(energy["joules"], float) and energy["joules"] > 0


def _streamed_energy(client: OpenAI, messages: list[dict[str, str]]) -> dict[str, object]:
    energy: dict[str, object] = {}
    for chunk in client.chat.completions.create(
        model=BUNDLED_MODEL_ALIAS, messages=messages, max_tokens=2, stream=True
    ):
        energy = (chunk.model_extra or {}).get("energy", energy)
    return energy


def test_a_prompt_counts_the_same_streamed_and_not(client: OpenAI) -> None:
    """A shape (three messages) no non-streamed answer has shown yet: the stream's count is
    the text's alone, and says so; once the backend has counted one, streams match it."""
    messages = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a colour."},
        {"role": "user", "content": "Another one, please."},
    ]
    first = _streamed_energy(client, messages)
    assert first["tokens_source"] == "proxy; prompt text only"
    plain = client.chat.completions.create(
        model=BUNDLED_MODEL_ALIAS, messages=messages, max_tokens=2
    )
    assert plain.usage is not None
    assert isinstance(first["prompt_tokens"], int)
    assert 0 < first["prompt_tokens"] < plain.usage.prompt_tokens  # the template is missing
    again = _streamed_energy(client, messages)
    assert again["tokens_source"] == "proxy"
    assert again["prompt_tokens"] == plain.usage.prompt_tokens


def test_raw_stream_ends_with_energy_then_done(proxy: ChildServer) -> None:
    with httpx.stream(
        "POST",
        proxy.url + "/v1/completions",
        json={"model": BUNDLED_MODEL_ALIAS, "prompt": "1, 2, 3,", "max_tokens": 6, "stream": True},
        timeout=120,
    ) as r:
        assert r.status_code == 200
        datas = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert datas[-1] == "[DONE]"
    final = json.loads(datas[-2])
    assert final["choices"] == [] and final["energy"]["joules"] > 0


def test_concurrent_requests_share_energy_and_metrics_add_up(
    client: OpenAI, proxy: ChildServer
) -> None:
    def ask(i: int) -> float:
        r = client.chat.completions.create(
            model=BUNDLED_MODEL_ALIAS,
            messages=[{"role": "user", "content": f"Count to {i + 3}."}],
            max_tokens=10,
            temperature=0,
        )
        return float((r.model_extra or {})["energy"]["joules"])

    with ThreadPoolExecutor(3) as pool:
        joules = list(pool.map(ask, range(3)))
    assert all(j > 0 for j in joules)
    total = sum(v for _, v in metric_samples(proxy.url, "energy_proxy_request_energy_joules_sum"))
    attributed = sum(
        v
        for labels, v in metric_samples(proxy.url, "energy_proxy_energy_joules_total")
        if labels["scope"] == "attributed"
    )
    # Conservation through the real stack: what requests were told adds up to what was
    # attributed (nothing is in flight now).
    assert total == pytest.approx(attributed, rel=1e-6)
    # Summed over categories: the classifier may put these prompts in different ones.
    answered = sum(
        v
        for labels, v in metric_samples(proxy.url, "energy_proxy_requests_total")
        if labels["status"] == "200" and labels["model"] == BUNDLED_MODEL_ALIAS
    )
    assert answered >= 3


def test_a_client_request_id_that_is_not_a_uuid_works(proxy: ChildServer) -> None:
    """llama-cpp-python answers 400 to a non-UUID x-request-id; the proxy keeps the
    client's id for itself and its answer, and does not pass it on to that backend."""
    r = httpx.post(
        f"{proxy.url}/v1/chat/completions",
        json={
            "model": BUNDLED_MODEL_ALIAS,
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 4,
        },
        headers={"x-request-id": "my-app-request-42"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "my-app-request-42"
    assert r.json()["energy"]["client_request_id"] == "my-app-request-42"
