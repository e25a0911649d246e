"""The energy where each client library lets app code read it, through the real clients
against a real `energy-proxy serve` and the stand-in backend on real sockets: the
`openai` SDK (the body's `energy`, `usage.energy`, the final stream chunk) and
LangChain's `ChatOpenAI`, which keeps a non-streamed answer's raw `usage` as
`response_metadata["token_usage"]` and of a stream only token counts: there the app
reads the request's id from the headers LangChain keeps and asks the proxy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI

from backends.local.launch import proxy_server


@pytest.fixture
def proxy_url(fake_server: str, tmp_path: Path) -> Iterator[str]:
    server = proxy_server(
        fake_server,
        extra_args=["--power-source", "constant:50", "--db", str(tmp_path / "r.db")],
        log_path=tmp_path / "proxy.log",
    )
    with server:
        yield server.url


def test_openai_reads_the_energy_in_the_body_and_in_usage(proxy_url: str) -> None:
    client = openai.OpenAI(base_url=proxy_url + "/v1", api_key="unused")
    raw = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}]
    )
    resp = raw.parse()
    assert resp.model_extra is not None and resp.usage is not None
    energy = resp.model_extra["energy"]
    assert resp.usage.model_extra is not None
    extra = resp.usage.model_extra
    assert extra["energy_millijoules"] == round(energy["joules"] * 1000)
    assert extra["co2eq_micrograms"] == round(energy["co2eq_g"] * 1e6)
    assert energy["joules"] == pytest.approx(float(raw.headers["x-energy-joules"]), rel=1e-3)
    assert resp.usage.prompt_tokens > 0  # usage itself is as the backend said


def test_openai_streamed_finds_the_energy_on_the_finish_chunk_and_the_last(proxy_url: str) -> None:
    client = openai.OpenAI(base_url=proxy_url + "/v1", api_key="unused")
    chunks = list(
        client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finished) == 1
    on_finish = (finished[0].model_extra or {})["energy"]
    last = (chunks[-1].model_extra or {})["energy"]
    assert on_finish == last and last["joules"] > 0  # the same figures, told twice


def test_langchain_keeps_the_energy_of_a_non_streamed_answer(proxy_url: str) -> None:
    llm = ChatOpenAI(model="fake-model", base_url=proxy_url + "/v1", api_key="unused")
    message = llm.invoke("hi")
    usage = message.response_metadata["token_usage"]
    assert usage["energy_millijoules"] > 0
    assert usage["co2eq_micrograms"] > 0


def test_langchain_batches_still_add_their_usage(proxy_url: str) -> None:
    # LangChain sums the token_usage of the answers of one call (n > 1, or a batch
    # through generate): the energy object must not break that sum.
    llm = ChatOpenAI(model="fake-model", base_url=proxy_url + "/v1", api_key="unused")
    result = llm.generate([[HumanMessage("hi")], [HumanMessage("there")]])
    assert len(result.generations) == 2
    usage = (result.llm_output or {}).get("token_usage", {})
    assert usage.get("total_tokens", 0) > 0
    # The batch's energy, summed as its tokens are (whole millijoules: no warning).
    each = [g[0].message.response_metadata["token_usage"]["energy_millijoules"]
            for g in result.generations]  # type: ignore[attr-defined]  # fmt: skip
    assert usage["energy_millijoules"] == sum(each)


def test_langchain_streamed_finds_the_energy_by_the_request_id(proxy_url: str) -> None:
    # LangChain rebuilds a stream's chunks from the fields it knows (the energy event,
    # and `usage` past its token counts, are dropped); it keeps the response's headers
    # when asked, and the proxy's id in them finds the record once the stream ended.
    llm = ChatOpenAI(
        model="fake-model",
        base_url=proxy_url + "/v1",
        api_key="unused",
        include_response_headers=True,
        stream_usage=True,
    )
    chunks = list(llm.stream("hi"))
    request_id = chunks[0].response_metadata["headers"]["x-energy-request-id"]
    found = httpx.get(f"{proxy_url}/v1/energy/requests/{request_id}", timeout=10)
    assert found.status_code == 200, found.text
    energy = found.json()
    assert energy["request_id"] == request_id
    assert energy["joules"] > 0
    output_tokens = sum((c.usage_metadata or {}).get("output_tokens", 0) for c in chunks)
    assert output_tokens > 0 and energy["completion_tokens"] == output_tokens
