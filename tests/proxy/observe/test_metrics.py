"""/metrics against the contract: every metric of docs/INTERFACE.md's metrics table, with its type
and exactly its labels, parsed by prometheus_client's own parser from a proxy on a real
socket (with a live carbon figure from the Electricity Maps stand-in, so that the gauges
that exist only while one is in use are there too)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from metering.carbon.electricitymaps import ElectricityMapsIntensity
from metering.sources.constant import ConstantSource
from proxy.app import create_app
from proxy.carbon_client import HttpxFetch
from tests.conftest import proxy_settings
from tests.support.fakes.electricitymaps import FAKE_API_KEY, make_fake_electricitymaps
from tests.support.paths import REPO_ROOT
from tests.support.servers import ServerThread

INTERFACE = REPO_ROOT / "docs" / "INTERFACE.md"
README = REPO_ROOT / "README.md"
KEY = "interface-test-key"
ROW = re.compile(r"^\| `(energy_proxy_\w+)` \| (counter|gauge|histogram) \| ([^|]*)\|", re.M)
# Names users and dashboards were promised from the start: the table must keep them all.
PROMISED = {
    "energy_proxy_requests_total",
    "energy_proxy_request_energy_joules",
    "energy_proxy_request_co2eq_grams",
    "energy_proxy_request_duration_seconds",
    "energy_proxy_tokens_total",
    "energy_proxy_energy_joules_total",
    "energy_proxy_power_watts",
    "energy_proxy_carbon_intensity_grams_per_kwh",
    "energy_proxy_inflight_requests",
    "energy_proxy_backend_inflight_requests",
}


def table(path: Path, heading: str) -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (type, label names) from the metrics table under `heading` in `path`."""
    text = path.read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ")[0]
    return {
        name: (kind, frozenset(n.strip() for n in labels.split(",") if n.strip()))
        for name, kind, labels in ROW.findall(section)
    }


def contract() -> dict[str, tuple[str, frozenset[str]]]:
    """The contract's metrics: docs/INTERFACE.md's table."""
    return table(INTERFACE, "Prometheus metrics")


def test_the_readme_shows_the_contract_s_metrics_table() -> None:
    # The README repeats the table for its readers: it must say what the contract says.
    assert contract(), "docs/INTERFACE.md has no metrics table"
    assert table(README, "Metrics") == contract()


@pytest.fixture
def proxy(fake_server: str, tmp_path: Path) -> Iterator[str]:
    em_app, _ = make_fake_electricitymaps()
    with ServerThread(em_app) as em_url:
        provider = ElectricityMapsIntensity(
            em_url,
            FAKE_API_KEY,
            zone="DE",
            static_g_per_kwh=480.0,
            refresh_s=60.0,
            fetch=HttpxFetch(),
        )
        settings = proxy_settings(
            tmp_path, backends=[f"fake={fake_server}"], backend_metrics_s=0.05, api_keys=[KEY]
        )
        app = create_app(
            settings, sources=[ConstantSource(100.0, start_s=time.monotonic())], intensity=provider
        )
        with ServerThread(app) as url:
            yield url


def test_the_readme_table_keeps_every_promised_metric() -> None:
    table = contract()
    assert set(table) >= PROMISED, sorted(PROMISED - set(table))
    assert table["energy_proxy_requests_total"] == (
        "counter",
        frozenset({"model", "category", "backend", "endpoint", "status"}),
    )


def test_every_metric_of_the_contract_with_its_type_and_labels(proxy: str) -> None:
    expected = contract()
    r = httpx.post(
        f"{proxy}/v1/chat/completions",
        json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {KEY}"},  # a tenant, for the tenant metrics
    )
    assert r.status_code == 200
    assert r.headers["x-carbon-intensity-source"] == "electricitymaps"
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(f"{proxy}/metrics").text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        waiting_for = [
            n
            for n in (
                "energy_proxy_backend_inflight_requests",
                "energy_proxy_backend_untracked_tokens",
            )
            if not (n in families and families[n].samples)
        ]
        if not waiting_for or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for name, (kind, labels) in expected.items():
        # The parser names counters without their _total suffix.
        fam = families.get(name.removesuffix("_total") if kind == "counter" else name)
        assert fam is not None, f"{name} missing from /metrics"
        assert fam.type == kind, f"{name}: {fam.type} != {kind}"
        assert fam.samples, f"{name} has no samples"
        for s in fam.samples:
            got = set(s.labels) - {"le"}
            assert got == labels, f"{name}: labels {sorted(got)} != {sorted(labels)}"
    exposed = {
        f.name
        for f in families.values()
        # prometheus_client's `_created` timestamps of counters and histograms read as
        # families of their own to the parser; they are not metrics of ours.
        if f.name.startswith("energy_proxy_") and not f.name.endswith("_created")
    }
    documented = {n.removesuffix("_total") for n in expected}
    assert exposed <= documented, (
        f"exposed but not in docs/INTERFACE.md: {sorted(exposed - documented)}"
    )


def test_a_model_no_backend_lists_is_labelled_other(proxy: str) -> None:
    r = httpx.post(
        f"{proxy}/v1/chat/completions",
        json={"model": "not-listed", "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 404
    text = httpx.get(f"{proxy}/metrics").text
    models = {
        s.labels.get("model")
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if "model" in s.labels
    }
    assert "not-listed" not in models
    assert "other" in models
