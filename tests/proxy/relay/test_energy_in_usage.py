"""The energy where each client library lets app code read it, through the real clients
against a real `energy-proxy serve` and the stand-in backend on real sockets: the
`openai` SDK (the body's `energy`, `usage.energy`, the final stream chunk) and
LangChain's `ChatOpenAI`, which keeps a non-streamed answer's raw `usage` as
`response_metadata["token_usage"]`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
