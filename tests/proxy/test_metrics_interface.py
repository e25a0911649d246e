"""/metrics against the contract: every metric of INTERFACE.md's table, with its type and
exactly its labels, parsed by prometheus_client's own parser from a proxy on a real socket."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import serve_proxy

INTERFACE = Path(__file__).resolve().parents[3] / "shared" / "INTERFACE.md"
ROW = re.compile(r"^\| `(energy_proxy_\w+)` \| (counter|gauge|histogram) \| ([^|]*)\|", re.M)


def contract() -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (type, label names) from the metrics table of INTERFACE.md."""
    rows = ROW.findall(INTERFACE.read_text(encoding="utf-8"))
    out = {}
    for name, kind, labels in rows:
        # "backend (the backend's own count, ...)" and "type (`prompt`/`completion`)"
        names = {p.strip() for p in re.sub(r"\([^)]*\)", "", labels).split(",")}
        out[name] = (kind, frozenset(n for n in names if n))
    return out


@pytest.fixture
def proxy(fake_server: str, tmp_path: Path) -> Iterator[str]:
    with serve_proxy(tmp_path, fake_server, backend_metrics_s=0.05) as url:
        yield url


def test_every_metric_of_the_contract_with_its_type_and_labels(proxy: str) -> None:
    expected = contract()
    assert len(expected) >= 10, f"could not read the metrics table of {INTERFACE}"
    r = httpx.post(
        f"{proxy}/v1/chat/completions",
        json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 200
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(f"{proxy}/metrics").text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        own = families.get("energy_proxy_backend_inflight_requests")
        if (own is not None and own.samples) or time.monotonic() > deadline:
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


def test_a_model_no_backend_lists_is_labelled_other(proxy: str) -> None:
    r = httpx.post(
        f"{proxy}/v1/chat/completions",
        json={"model": "not-listed", "messages": [{"role": "user", "content": "hi"}]},
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
