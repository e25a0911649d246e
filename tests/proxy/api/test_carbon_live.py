"""Live carbon intensity through the whole proxy: the proxy, the fake backend and the
Electricity Maps stand-in each on a real 127.0.0.1 socket, the real `openai` client reading
the headers. The stand-in counts its calls, so "once per refresh period, not per request"
is a count, not a timing."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from metering.carbon.electricitymaps import ElectricityMapsIntensity
from metering.carbon.sci import operational_g
from metering.sources.constant import ConstantSource
from proxy.app import create_app
from proxy.carbon_client import HttpxFetch
from proxy.settings import ConfigError, load_settings
from tests.conftest import proxy_settings, serve_proxy
from tests.support.fakes.electricitymaps import (
    FAKE_API_KEY,
    FakeGridState,
    make_fake_electricitymaps,
)
from tests.support.polling import wait_for
from tests.support.servers import ServerThread

CHAT: dict[str, Any] = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def grid() -> Iterator[tuple[FakeGridState, str]]:
    app, state = make_fake_electricitymaps()
    with ServerThread(app) as url:
        yield state, url


def serve_with(
    tmp_path: Path, backend_url: str, provider: ElectricityMapsIntensity
) -> ServerThread:
    settings = proxy_settings(tmp_path, backends=[f"fake={backend_url}"])
    app = create_app(
        settings, sources=[ConstantSource(100.0, start_s=time.monotonic())], intensity=provider
    )
    return ServerThread(app)


def chat(proxy: str) -> httpx.Response:
    r = httpx.post(f"{proxy}/v1/chat/completions", json={**CHAT, "max_tokens": 3}, timeout=10)
    assert r.status_code == 200, r.text
    return r


def gauge(proxy: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = httpx.get(f"{proxy}/metrics").text
    return {
        tuple(sorted(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name
    }


def test_live_intensity_reaches_headers_body_sse_and_metrics(
    tmp_path: Path, fake_server: str, grid: tuple[FakeGridState, str]
) -> None:
    state, em_url = grid
    with serve_proxy(
        tmp_path,
        fake_server,
        carbon_zone="FR",
        electricitymaps_url=em_url,
        electricitymaps_api_key=FAKE_API_KEY,
    ) as proxy:
        assert wait_for(lambda: state.calls >= 1)
        assert wait_for(
            lambda: httpx.get(f"{proxy}/readyz").json()["carbon"]["source"] != "fallback"
        )
        with openai.OpenAI(base_url=f"{proxy}/v1", api_key="unused", max_retries=0) as client:
            raw = client.chat.completions.with_raw_response.create(
                model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
        h = raw.headers
        assert h["x-carbon-intensity"] == "50"
        assert h["x-carbon-intensity-source"] == "electricitymaps"
        assert float(h["x-carbon-intensity-age-s"]) >= 0.0
        energy = json.loads(raw.http_response.text)["energy"]
        assert energy["co2eq_g"] == pytest.approx(operational_g(energy["joules"], 50.0))
        assert float(h["x-co2eq-grams"]) == pytest.approx(energy["co2eq_g"], rel=5e-4)
        assert energy["carbon_intensity_zone"] == "FR"
        assert energy["carbon_intensity_source"] == "electricitymaps"

        # A streamed answer's final event carries the same figure.
        with httpx.stream(
            "POST", f"{proxy}/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 2}
        ) as r:
            datas = [ln[6:] for ln in r.read().decode().splitlines() if ln.startswith("data: ")]
        final = json.loads(datas[-2])["energy"]
        assert final["carbon_intensity_g_per_kwh"] == 50.0
        assert final["carbon_intensity_source"] == "electricitymaps"

        g = gauge(proxy, "energy_proxy_carbon_intensity_grams_per_kwh")
        assert g == {(("source", "electricitymaps"), ("zone", "FR")): 50.0}
        assert gauge(proxy, "energy_proxy_carbon_intensity_age_seconds")

        # The key went out in the auth-token header (the stand-in checks it), and the
        # refresh is hourly by default: many requests, one call.
        for _ in range(10):
            chat(proxy)
        assert state.calls == 1
        assert all(r["token_ok"] and r["query"] == {"zone": "FR"} for r in state.requests)


def test_called_once_per_refresh_period_not_per_request(
    tmp_path: Path, fake_server: str, grid: tuple[FakeGridState, str]
) -> None:
    state, em_url = grid
    with serve_proxy(
        tmp_path,
        fake_server,
        carbon_lat=52.5,
        carbon_lon=13.4,
        electricitymaps_url=em_url,
        electricitymaps_api_key=FAKE_API_KEY,
        carbon_refresh_s=0.3,
    ) as proxy:
        assert wait_for(lambda: state.calls >= 1)
        before = state.calls
        sent = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert chat(proxy).headers["x-carbon-intensity"] == "350"
            sent += 1
        during = state.calls - before
        # About 1.0 s / 0.3 s refreshes; however many requests went through meanwhile.
        assert sent > during + 2
        assert 1 <= during <= 5
        assert {r["query"]["lat"] for r in state.requests} == {"52.5"}


def test_outage_serves_cached_with_its_age_then_recovers(
    tmp_path: Path, fake_server: str, grid: tuple[FakeGridState, str]
) -> None:
    state, em_url = grid
    provider = ElectricityMapsIntensity(
        em_url,
        FAKE_API_KEY,
        zone="DE",
        static_g_per_kwh=480.0,
        refresh_s=0.2,
        base_backoff_s=0.05,
        max_backoff_s=0.2,
        fetch=HttpxFetch(),
    )
    with serve_with(tmp_path, fake_server, provider) as proxy:
        assert wait_for(lambda: provider.latest is not None)
        assert chat(proxy).headers["x-carbon-intensity-source"] == "electricitymaps"

        state.fail_status = 500
        assert wait_for(lambda: provider.failures >= 1)
        h = chat(proxy).headers
        assert h["x-carbon-intensity-source"] == "cached"
        assert h["x-carbon-intensity"] == "350"
        first_age_s = float(h["x-carbon-intensity-age-s"])
        assert wait_for(
            lambda: float(chat(proxy).headers["x-carbon-intensity-age-s"]) > first_age_s
        )
        ready = httpx.get(f"{proxy}/readyz")
        assert ready.status_code == 200  # a stale carbon figure never makes the proxy unready
        assert ready.json()["carbon"]["source"] == "cached"
        assert "500" in ready.json()["carbon"]["error"]

        state.healthy()
        state.zones["DE"] = 300.0
        assert wait_for(lambda: provider.failures == 0)
        h = chat(proxy).headers
        assert h["x-carbon-intensity-source"] == "electricitymaps"
        assert h["x-carbon-intensity"] == "300"


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ({"api_key": "another-key"}, "401"),
        ({"fail_status": 429, "retry_after": "3600"}, "429"),
        ({"malformed": True}, "malformed"),
    ],
)
def test_no_good_answer_yet_gives_the_static_fallback(
    tmp_path: Path,
    fake_server: str,
    grid: tuple[FakeGridState, str],
    fault: dict[str, Any],
    reason: str,
) -> None:
    state, em_url = grid
    for k, v in fault.items():
        setattr(state, k, v)
    with serve_proxy(
        tmp_path,
        fake_server,
        carbon_zone="DE",
        carbon_intensity=420.0,
        electricitymaps_url=em_url,
        electricitymaps_api_key=FAKE_API_KEY,
    ) as proxy:
        assert wait_for(lambda: "error" in httpx.get(f"{proxy}/readyz").json()["carbon"])
        h = chat(proxy).headers
        assert h["x-carbon-intensity-source"] == "fallback"
        assert h["x-carbon-intensity"] == "420"
        assert "x-carbon-intensity-age-s" not in h
        carbon = httpx.get(f"{proxy}/readyz").json()["carbon"]
        assert reason in carbon["error"]
        assert FAKE_API_KEY not in httpx.get(f"{proxy}/readyz").text
        # Backed off: one call, not one per request or per tick.
        for _ in range(5):
            chat(proxy)
        assert state.calls == 1


def test_zone_without_a_key_is_a_clear_start_up_error() -> None:
    with pytest.raises(ConfigError, match="ELECTRICITYMAPS_API_KEY"):
        load_settings({"carbon_zone": "DE", "backend": ["http://127.0.0.1:1"]}, {})


def test_the_key_comes_from_its_variable_and_is_never_echoed() -> None:
    s = load_settings(
        {"carbon_zone": "DE", "backend": ["http://127.0.0.1:1"]},
        {"ELECTRICITYMAPS_API_KEY": "secret-key-123"},
    )
    assert s.electricitymaps_api_key == "secret-key-123"
    assert "secret-key-123" not in repr(s)
    with pytest.raises(ConfigError) as err:
        load_settings(
            {"carbon_zone": "DE", "carbon_lat": 1.0, "carbon_lon": 2.0},
            {"ELECTRICITYMAPS_API_KEY": "secret-key-123"},
        )
    assert "not both" in str(err.value)
    assert "secret-key-123" not in str(err.value)


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        ({"carbon_lat": 52.0}, "go together"),
        ({"carbon_lat": 95.0, "carbon_lon": 0.0}, "carbon-lat"),
        ({"carbon_zone": " "}, "empty"),
        ({"carbon_refresh_s": 0}, "carbon-refresh-s"),
    ],
)
def test_bad_carbon_settings(flags: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_settings(flags, {"ELECTRICITYMAPS_API_KEY": "k"})
