"""Routing among backends that serve one model, end to end in real time: three stand-in
GPU backends on their own sockets (two that differ in cost and zone, one that goes down
mid-run), the proxy on a socket, the real `openai` client, a fake Electricity Maps API."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from metering.store import RequestStore
from proxy.settings import ConfigError, load_settings
from tests.support.fakes.batching_backend import scaled
from tests.support.fakes.batching_engine import EngineConfig
from tests.support.fakes.electricitymaps import (
    FAKE_API_KEY,
    FakeGridState,
    make_fake_electricitymaps,
)
from tests.support.polling import wait_until
from tests.support.routing import MODEL, Fleet, Site, costlier
from tests.support.servers import ServerThread

CHEAP = EngineConfig()
DEAR = costlier(CHEAP, 1.5)


def ask(client: openai.OpenAI, tokens: int = 8, chars: int = 400) -> tuple[str, dict[str, Any]]:
    """One streamed request: the `x-energy-route` header and the final event's energy."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, stream=True, max_tokens=tokens,
        messages=[{"role": "user", "content": "x" * chars}],
    )  # fmt: skip
    energy: dict[str, Any] = {}
    for chunk in raw.parse():
        energy = (chunk.model_extra or {}).get("energy", energy)
    return raw.headers["x-energy-route"], energy


def route_of(header: str) -> dict[str, str]:
    return dict(part.strip().split("=", 1) for part in header.split(";"))


@contextlib.contextmanager
def serving(tmp_path: Path, sites: list[Site], **settings: Any) -> Iterator[tuple[Fleet, Any]]:
    """The backends and the proxy, ready, and the real `openai` client pointed at it."""
    with (
        Fleet(tmp_path, sites, **settings) as fleet,
        openai.OpenAI(base_url=f"{fleet.proxy_url}/v1", api_key="x", max_retries=0) as client,
    ):
        wait_until(lambda: httpx.get(f"{fleet.proxy_url}/readyz").status_code == 200, 20)
        yield fleet, client


def metrics(url: str) -> dict[str, list[Any]]:
    text = httpx.get(f"{url}/metrics").text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def routed(url: str) -> Counter[tuple[str, str, str]]:
    out: Counter[tuple[str, str, str]] = Counter()
    for s in metrics(url)["energy_proxy_routed_requests"]:
        if s.name.endswith("_total"):
            out[(s.labels["backend"], s.labels["policy"], s.labels["reason"])] += int(s.value)
    return out


def test_first_takes_the_first_and_fails_over_when_it_goes_down(tmp_path: Path) -> None:
    sites = [Site("a", CHEAP), Site("b", DEAR), Site("c", CHEAP)]
    with serving(tmp_path, sites, route="first") as (fleet, client):
        for _ in range(4):
            header, energy = ask(client)
            assert route_of(header) == {"policy": "first", "backend": "a", "reason": "first"}
        rid = energy["request_id"]
        fleet.stop("a")
        failures, backends = 0, []
        for _ in range(6):
            try:
                header, _ = ask(client)
            except openai.APIError:
                failures += 1  # the request that finds it gone
                continue
            backends.append(route_of(header)["backend"])
        assert failures <= 1
        assert backends and set(backends) == {"b"}, backends  # the next in order, not c
        counts = routed(fleet.proxy_url)
        assert counts[("a", "first", "first")] >= 4
        assert counts[("b", "first", "first")] == len(backends)
    # The stored record says where it went and why.
    with RequestStore.open(str(tmp_path / "requests.db")) as store:
        record = store.db.get(rid, None)
        assert record is not None and (record.backend, record.route) == ("a", "first/first")


def test_least_loaded_spreads_a_burst(tmp_path: Path) -> None:
    sites = [Site("a", CHEAP), Site("b", DEAR), Site("c", CHEAP)]
    with serving(tmp_path, sites, route="least-loaded") as (_fleet, client):
        with ThreadPoolExecutor(9) as pool:
            headers = [h for h, _ in pool.map(lambda _: ask(client, 64), range(9))]
        got = Counter(route_of(h)["backend"] for h in headers)
        assert set(got) == {"a", "b", "c"}, got
        assert max(got.values()) <= 5, got


def test_carbon_follows_the_zones_and_a_change_within_one_refresh(tmp_path: Path) -> None:
    grid = FakeGridState(zones={"DE": 300.0, "FR": 50.0})
    app, _ = make_fake_electricitymaps(grid)
    with ServerThread(app) as em:
        sites = [Site("de", CHEAP, zone="DE"), Site("fr", CHEAP, zone="FR")]
        with (
            Fleet(
                tmp_path, sites, route="carbon", route_explore=0.0, electricitymaps_url=em,
                electricitymaps_api_key=FAKE_API_KEY, carbon_refresh_s=1.0,
            ) as fleet,
            openai.OpenAI(base_url=f"{fleet.proxy_url}/v1", api_key="x", max_retries=0) as c,
        ):  # fmt: skip
            url = fleet.proxy_url
            wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 20)
            ready = httpx.get(f"{url}/readyz").json()["backends"]
            zones = {b["name"]: b["routing"]["carbon"]["zone"] for b in ready}
            assert zones == {"de": "DE", "fr": "FR"}
            assert all(b["routing"]["marginal_j_per_token"] > 0 for b in ready)
            first = [ask(c) for _ in range(12)]
            picked = Counter(route_of(h)["backend"] for h, _ in first)
            assert picked["fr"] == 12, picked
            # Each answer carries its own backend's zone.
            for header, energy in first:
                zone = energy["carbon_intensity_zone"]
                assert zone == route_of(header)["backend"].upper()
            # Three times DE's now: clear even if only one backend's cost model is fitted
            # by then (the other's defaults are unsure by a factor of 4 at 90 %).
            grid.zones["FR"] = 900.0
            # The intensity is read again every second (--carbon-refresh-s 1): chosen
            # for the figure, not by exploration.
            changed = {"policy": "carbon", "backend": "de", "reason": "lowest"}
            wait_until(lambda: route_of(ask(c)[0]) == changed, 10)
            later = Counter(route_of(ask(c)[0])["backend"] for _ in range(10))
            assert later["de"] == 10, later


def test_the_marginal_gauges_parse_and_agree_with_the_records(tmp_path: Path) -> None:
    sites = [Site("a", CHEAP), Site("b", DEAR)]
    with serving(tmp_path, sites, route="least-loaded") as (fleet, client):
        per_token: dict[str, list[float]] = {"a": [], "b": []}
        for _ in range(6):
            with ThreadPoolExecutor(4) as pool:
                # the gauges' reference shape: 512 prompt tokens, 128 output
                for header, energy in pool.map(lambda _: ask(client, 128, 2048), range(4)):
                    tokens = energy["completion_tokens"]
                    per_token[route_of(header)["backend"]].append(energy["dynamic_joules"] / tokens)
        found = metrics(fleet.proxy_url)
        for name in (
            "energy_proxy_backend_marginal_joules_per_token",
            "energy_proxy_backend_marginal_co2eq_grams_per_token",
        ):
            for suffix in ("", "_low", "_high"):
                samples = found[name + suffix]
                assert {s.labels["backend"] for s in samples} == {"a", "b"}
                assert {s.labels["model"] for s in samples} == {MODEL}
        gauge = {
            (s.labels["backend"], bound): s.value
            for bound in ("", "_low", "_high")
            for s in found["energy_proxy_backend_marginal_joules_per_token" + bound]
        }
        for b, figures in per_token.items():
            assert figures, b
            mean = sum(figures) / len(figures)
            low, high = gauge[(b, "_low")], gauge[(b, "_high")]
            assert low <= mean <= high, (b, low, mean, high)
            assert low < gauge[(b, "")] < high


def test_energy_and_carbon_refuse_backends_that_share_gpus() -> None:
    flags = {"backend": ["a=http://127.0.0.1:1", "b=http://127.0.0.1:2"], "route": "energy"}
    with pytest.raises(ConfigError, match=r"measured apart.*backend a names no gpus"):
        load_settings(flags, {})
    with pytest.raises(ConfigError, match="share GPU 0"):
        load_settings(
            {"backend": [
                {"name": "a", "url": "http://127.0.0.1:1", "gpus": [0, 1]},
                {"name": "b", "url": "http://127.0.0.1:2", "gpus": [0]},
            ], "route": "carbon"},
            {},
        )  # fmt: skip
    # first and least-loaded need nothing measured apart
    assert load_settings({**flags, "route": "least-loaded"}, {}).route == "least-loaded"


def test_energy_learns_the_cheaper_backends_and_fails_over(tmp_path: Path) -> None:
    """Three backends on their own GPUs, none on the defaults' costs: the energy policy
    shares them while it cannot tell them apart, then sends the traffic to the two cheap
    ones (the dear one keeps only the exploration share), and when one of those goes down
    the rest goes to the other."""
    base = scaled(CHEAP, 2.0)
    sites = [
        Site("dear", costlier(base, 1.6)),  # configured first: `first` would pick it
        Site("cheap", costlier(base, 0.6)),
        Site("spare", costlier(base, 0.6)),
    ]
    with (
        Fleet(tmp_path, sites, route="energy", route_explore=0.05) as fleet,
        openai.OpenAI(base_url=f"{fleet.proxy_url}/v1", api_key="x", max_retries=0) as client,
    ):
        url = fleet.proxy_url

        def fitted() -> bool:
            models = [b["cost_model"] for b in httpx.get(f"{url}/readyz").json()["backends"]]
            return all(m["in_use"] == "fitted" for m in models)

        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 20)

        def load(n: int) -> list[dict[str, str]]:
            with ThreadPoolExecutor(6) as pool:
                return [route_of(h) for h, _ in pool.map(lambda _: ask(client, 48), range(n))]

        deadline = time.monotonic() + 150  # about 15 s here; a slow machine fits later
        while not fitted() and time.monotonic() < deadline:
            load(12)
        assert fitted(), httpx.get(f"{url}/readyz").json()
        settled = load(60)
        dear = [r for r in settled if r["backend"] == "dear"]
        assert len(dear) <= 8, Counter(r["backend"] for r in settled)  # ~5 % + chance
        assert all(r["reason"] == "explore" for r in dear), dear
        fleet.stop("spare")
        after: list[dict[str, str]] = []
        failures = 0
        for _ in range(20):
            try:
                after.append(route_of(ask(client, 16)[0]))
            except openai.APIError:
                failures += 1
        assert failures <= 1
        assert not any(r["backend"] == "spare" for r in after[1:]), after
        assert sum(r["backend"] == "cheap" for r in after) >= 15, after


def test_the_guard_sends_a_burst_on_when_the_best_backend_is_full(tmp_path: Path) -> None:
    """Carbon prefers the clean grid, but it runs two at once (configured): of a burst of
    eight, it takes two (a third would wait there); the rest go to the other backend."""
    sites = [
        Site("clean", EngineConfig(max_running=2), intensity=30.0, max_running=2),
        Site("dirty", CHEAP, intensity=600.0),
    ]
    with serving(tmp_path, sites, route="carbon", route_explore=0.0) as (_fleet, client):
        alone = route_of(ask(client)[0])
        assert alone == {"policy": "carbon", "backend": "clean", "reason": "lowest"}
        with ThreadPoolExecutor(8) as pool:
            burst = [route_of(h) for h, _ in pool.map(lambda _: ask(client, 192), range(8))]
        got = Counter(r["backend"] for r in burst)
        assert got == Counter({"clean": 2, "dirty": 6}), burst
