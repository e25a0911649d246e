"""The cost model and the band, as a user reads them: the energy object, /readyz, /metrics."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import EnergyProxyApp

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello there"}]}


async def test_every_answer_carries_its_band_and_what_the_split_rested_on(
    proxy_app: EnergyProxyApp, client: httpx.AsyncClient
) -> None:
    r = await client.post("/v1/chat/completions", json=CHAT)
    energy = r.json()["energy"]
    assert energy["attribution"] == "model"
    assert 0.0 <= energy["joules_low"] <= energy["joules"] <= energy["joules_high"]
    # Before any fit the band is wide (the defaults' split), and says so.
    assert energy["joules_high"] > energy["joules"] * 1.2
    assert energy["attribution_basis"].startswith("cost-v1 defaults; queue capacity ")
    # The stored record answers the same, float for float.
    stored = await client.get(f"/v1/energy/requests/{energy['request_id']}")
    assert stored.json() == energy


async def test_readyz_and_metrics_show_each_backend_s_cost_model(
    proxy_app: EnergyProxyApp, client: httpx.AsyncClient
) -> None:
    await client.post("/v1/chat/completions", json=CHAT)
    ready = (await client.get("/readyz")).json()
    (backend,) = ready["backends"]
    model = backend["cost_model"]
    assert model["version"] == "cost-v1" and model["in_use"] == "defaults"
    assert model["fixed_w"] > 0 and model["prefill_j_per_token"] > 0
    assert model["fitted_at"] is None
    # One request, nothing waited: no capacity known; the fake reported no timings.
    assert (model["queue_capacity"], model["queue_capacity_source"]) == (None, "unknown")
    assert model["timed_requests"] == 0
    families = {
        f.name: f for f in text_string_to_metric_families((await client.get("/metrics")).text)
    }
    terms = {
        s.labels["term"]: s.value for s in families["energy_proxy_cost_model_coefficient"].samples
    }
    assert terms["fixed_w"] == model["fixed_w"]
    band = families["energy_proxy_request_energy_band_ratio"]
    counts = [s.value for s in band.samples if s.name.endswith("_count")]
    assert counts == [1.0]
