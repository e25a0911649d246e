"""Energy Score from the request store over HTTP: stars in /v1/energy/summary and the SVG
label, for two models whose energy per request differs by a known factor."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import httpx
import pytest

from metering.ratings.score import wh_per_1000_queries
from metering.sources.constant import ConstantSource
from proxy.app import create_app
from proxy.relay.upstream import HttpxUpstream
from tests.conftest import proxy_settings
from tests.support.fakes.openai_backend import FakeState, make_fake_backend

SVG = "{http://www.w3.org/2000/svg}"


async def test_stars_and_label_from_the_store(tmp_path: Path) -> None:
    backend_app, _ = make_fake_backend(FakeState(models=["small", "big", "org/sized"]))
    app = create_app(
        proxy_settings(tmp_path, idle_watts=0.0),
        upstream=HttpxUpstream(30.0, transport=httpx.ASGITransport(app=backend_app)),
        # At a constant 100 W a request's energy follows its duration: "big" is made to
        # take 4x as long as "small".
        sources=[ConstantSource(100.0, start_s=0.0)],
    )
    async with (
        app.running(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as c,
    ):

        async def ask(
            model: str, delay_s: str, n: int, category: str = "questions"
        ) -> list[dict[str, Any]]:
            out = []
            for _ in range(n):
                r = await c.post(
                    "/v1/chat/completions",
                    json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                    headers={"x-prompt-category": category, "x-fake-delay-s": delay_s},
                )
                assert r.status_code == 200
                out.append(r.json()["energy"])
            return out

        small = await ask("small", "0.01", 20)
        await ask("big", "0.04", 20)
        await ask("small", "0.01", 3, "code")  # another category, too few to rate
        doc = (await c.get("/v1/energy/summary")).json()
        rows = {(r["model"], r["category"]): r for r in doc["rows"]}
        s, b = rows[("small", "questions")], rows[("big", "questions")]
        assert s["count"] == b["count"] == 20
        assert s["stars"] == 5 and b["stars"] == 1  # the range's two ends
        mean_small = sum(e["joules"] for e in small) / 20
        assert s["wh_per_1000_queries"] == pytest.approx(wh_per_1000_queries(mean_small))
        assert b["wh_per_1000_queries"] > s["wh_per_1000_queries"]
        assert rows[("small", "code")]["stars"] is None

        r = await c.get("/v1/energy/label/big.svg", params={"category": "questions"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")
        root = ET.fromstring(r.text)
        assert root.tag == f"{SVG}svg" and root.get("data-stars") == "1"
        text = " ".join(t for t in root.itertext())
        assert "big" in text and "questions" in text and "20" in text
        assert (await c.get("/v1/energy/label/small.svg")).status_code == 200
        assert (await c.get("/v1/energy/label/nobody.svg")).status_code == 404
        missing = await c.get("/v1/energy/label/big.svg", params={"category": "sql"})
        assert missing.status_code == 404 and "sql" in missing.json()["error"]["message"]
        # A model id with a slash (as Hugging Face names go), sent as the page sends it.
        await ask("org/sized", "0.01", 1)
        r = await c.get("/v1/energy/label/org%2Fsized.svg")
        assert r.status_code == 200 and "org/sized" in r.text
        assert (await c.get("/v1/energy/label/org/sized.svg")).status_code == 200


async def test_a_since_outside_the_calendar_is_a_400_not_a_500(
    client: httpx.AsyncClient,
) -> None:
    # Year 1 at +00:01 is year 0 in UTC: Python cannot hold it.
    r = await client.get(
        "/v1/energy/summary", params={"since": "0001-01-01T00:00:00+00:01"}
    )
    assert r.status_code == 400
    assert "outside the calendar" in r.json()["error"]["message"]
    ok = await client.get("/v1/energy/summary", params={"since": "0001-01-02T00:00:00Z"})
    assert ok.status_code == 200 and ok.json()["since"] == "1970-01-01T00:00:00Z"
