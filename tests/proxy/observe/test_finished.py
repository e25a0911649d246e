"""The "request finished" fan-out: every observer in order, a failing one costs only itself."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.backend import Backend, BackendConfig
from metering.accounting.ledger import SourceShare
from metering.accounting.report import Tokens, build_report
from metering.carbon.intensity import Intensity
from proxy.app import EnergyProxyApp
from proxy.observe.finished import Observers, RequestFinished


def event(request_id: str = "req-1") -> RequestFinished:
    report = build_report(
        request_id=request_id,
        model="m",
        category="other",
        duration_s=1.0,
        tokens=Tokens(3, 4, "backend"),
        shares=[SourceShare("box", 10.0, 4.0)],
        domains={"box": "system"},
        methods=["constant"],
        intensity=Intensity(100.0, "static"),
    )
    return RequestFinished(
        report=report,
        energy=report.to_dict(),
        backend=Backend(BackendConfig("b", "http://127.0.0.1:1")),
        status=200,
        finished_at=0.0,
        tenant="",
        model_label="m",
    )


class Recorder:
    def __init__(self, seen: list[tuple[str, Any]], name: str) -> None:
        self.seen, self.name = seen, name

    def finished(self, e: RequestFinished) -> None:
        self.seen.append((self.name, e.report.request_id))


class Rejections(Recorder):
    def rejected(self, status: int) -> None:
        self.seen.append((self.name, status))


class Broken:
    def finished(self, e: RequestFinished) -> None:
        raise RuntimeError("disk on fire")

    def rejected(self, status: int) -> None:
        raise RuntimeError("still on fire")


def test_observers_are_told_in_the_order_they_were_registered() -> None:
    seen: list[tuple[str, Any]] = []
    fan = Observers([Recorder(seen, "a"), Rejections(seen, "b"), Recorder(seen, "c")])
    fan.finished(event("req-1"))
    fan.finished(event("req-2"))
    assert seen == [
        ("a", "req-1"),
        ("b", "req-1"),
        ("c", "req-1"),
        ("a", "req-2"),
        ("b", "req-2"),
        ("c", "req-2"),
    ]
    assert fan.failures == 0


def test_rejections_reach_only_the_observers_that_take_them() -> None:
    seen: list[tuple[str, Any]] = []
    fan = Observers([Recorder(seen, "a"), Rejections(seen, "b")])
    fan.rejected(401)
    assert seen == [("b", 401)]


def test_a_failing_observer_is_logged_counted_and_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[tuple[str, Any]] = []
    fan = Observers([Broken(), Rejections(seen, "after")])
    with caplog.at_level(logging.ERROR, logger="energy_proxy.observe"):
        fan.finished(event("req-9"))
        fan.rejected(413)
    assert seen == [("after", "req-9"), ("after", 413)]
    assert fan.failures == 2
    assert "Broken failed on request req-9" in caplog.text


async def test_a_store_that_raises_costs_the_record_not_the_answer_or_the_metrics(
    proxy_app: EnergyProxyApp, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(record: object) -> None:
        raise OSError("no space left on device")

    monkeypatch.setattr(proxy_app.store, "add", refuse)
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 200
    assert r.json()["energy"]["joules"] > 0
    assert proxy_app.ctx.observers.failures == 1
    metrics = (await client.get("/metrics")).text
    counted = [
        s.value
        for fam in text_string_to_metric_families(metrics)
        if fam.name == "energy_proxy_requests"
        for s in fam.samples
        if s.name == "energy_proxy_requests_total" and s.labels.get("status") == "200"
    ]
    assert counted == [1.0]
