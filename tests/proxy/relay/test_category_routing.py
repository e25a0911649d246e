"""Prompt categories through the proxy: the client's header wins, else the classifier reads
the prompt; the category reaches the headers, the energy object, the stream's final event,
the metrics and the request store."""

from __future__ import annotations

import json

import httpx
from prometheus_client.parser import text_string_to_metric_families

SQL = "SELECT name, COUNT(*) FROM orders JOIN users ON users.id = orders.user_id GROUP BY name;"


def chat(content: str, **extra: object) -> dict[str, object]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": content}], **extra}


async def test_classifier_decides_without_a_header(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat(f"Why is this query slow? {SQL}"))
    assert r.status_code == 200
    assert r.headers["x-prompt-category"] == "sql"
    assert r.json()["energy"]["category"] == "sql"
    r = await client.post(
        "/v1/chat/completions", json=chat("Traduis en allemand : « Le chat dort sur le canapé. »")
    )
    assert r.headers["x-prompt-category"] == "translation"


async def test_the_clients_header_wins(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json=chat(f"Why is this query slow? {SQL}"),
        headers={"x-prompt-category": "questions"},
    )
    assert r.headers["x-prompt-category"] == "questions"
    bad = await client.post(
        "/v1/chat/completions", json=chat("hi"), headers={"x-prompt-category": "poetry"}
    )
    assert bad.status_code == 400
    assert "code, math, other" in bad.json()["error"]["message"]


async def test_streams_metrics_and_store_carry_the_category(client: httpx.AsyncClient) -> None:
    prompt = "Solve for x: 3x^2 - 12x + 9 = 0, and show each step of the derivation."
    async with client.stream(
        "POST", "/v1/chat/completions", json=chat(prompt, stream=True, max_tokens=3)
    ) as r:
        assert r.headers["x-prompt-category"] == "math"
        datas = [ln[6:] async for ln in r.aiter_lines() if ln.startswith("data: ")]
    energy = json.loads(datas[-2])["energy"]
    assert energy["category"] == "math"
    stored = await client.get(f"/v1/energy/requests/{energy['request_id']}")
    assert stored.json()["category"] == "math"
    text = (await client.get("/metrics")).text
    counts = {
        s.labels["category"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "energy_proxy_requests_total"
    }
    assert counts == {"math": 1.0}
