"""The backends' own in-flight counts: parsing their /metrics, and the exported cross-check."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.own_metrics import (
    LLAMACPP_METRICS,
    TGI_METRICS,
    VLLM_METRICS,
    MetricNames,
    OwnMetrics,
    inflight_from_metrics,
    parse_own_metrics,
)
from tests.conftest import serve_proxy
from tests.support.fakes.kind_servers import recorded
from tests.support.fakes.openai_backend import FakeState
from tests.support.polling import wait_for

VLLM = """# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="a"} 3.0
vllm:num_requests_running{model_name="b"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="a"} 7.0
"""
TGI = "# TYPE tgi_batch_current_size gauge\ntgi_batch_current_size 4\n"
LLAMACPP = (
    "# HELP llamacpp:requests_processing Number of requests processing.\n"
    "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 1\n"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (VLLM, 5.0),  # summed over models; waiting requests are not running
        (TGI, 4.0),
        (LLAMACPP, 1.0),
        ("# TYPE other_metric gauge\nother_metric 9\n", None),
        ("", None),
        ("<html>not metrics</html>", None),
        ("{broken", None),
    ],
)
def test_inflight_from_metrics(text: str, expected: float | None) -> None:
    assert inflight_from_metrics(text) == expected


def gauges(proxy: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{proxy}/metrics").text):
        for s in fam.samples:
            if s.name in (
                "energy_proxy_inflight_requests",
                "energy_proxy_backend_inflight_requests",
            ):
                out.setdefault(s.name, {})[s.labels["backend"]] = s.value
    return out


def wait_for_gauges(proxy: str, want: dict[str, float], timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        g = gauges(proxy)
        got = {k: v.get("fake") for k, v in g.items()}
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


@pytest.fixture
def proxy(fake_server: str, tmp_path: Path) -> Iterator[str]:
    with serve_proxy(tmp_path, fake_server, backend_metrics_s=0.05) as url:
        yield url


def test_backend_and_proxy_counts_side_by_side(proxy: str, fake: tuple[Any, FakeState]) -> None:
    _, state = fake
    idle = {"energy_proxy_inflight_requests": 0.0, "energy_proxy_backend_inflight_requests": 0.0}
    assert wait_for_gauges(proxy, idle) == idle

    def slow() -> None:
        httpx.post(
            f"{proxy}/v1/chat/completions",
            json={"model": "fake-model", "messages": [{"role": "user", "content": "x"}]},
            headers={"x-fake-delay-s": "1.5"},
            timeout=30,
        )

    t = threading.Thread(target=slow)
    t.start()
    state.bypass_running = 2  # two requests reach the backend without the proxy
    try:
        busy = {
            "energy_proxy_inflight_requests": 1.0,
            "energy_proxy_backend_inflight_requests": 3.0,
        }
        assert wait_for_gauges(proxy, busy) == busy
    finally:
        t.join()
        state.bypass_running = 0
    assert wait_for_gauges(proxy, idle) == idle


def test_a_backend_without_metrics_has_no_series(proxy: str, fake: tuple[Any, FakeState]) -> None:
    _, state = fake
    state.exports_metrics = False
    deadline = time.monotonic() + 10
    while "energy_proxy_backend_inflight_requests" in gauges(proxy):
        assert time.monotonic() < deadline, "the series did not go away"
        time.sleep(0.05)
    assert gauges(proxy)["energy_proxy_inflight_requests"] == {"fake": 0.0}


@pytest.mark.parametrize(
    ("kind", "names", "expected"),
    [
        ("vllm", VLLM_METRICS, OwnMetrics(3.0, 12345.0, 6789.0, waiting=7.0)),
        ("tgi", TGI_METRICS, OwnMetrics(2.0, 2048.0, 1500.0, waiting=0.0)),
        ("llamacpp", LLAMACPP_METRICS, OwnMetrics(1.0, 75.0, 31.0, waiting=0.0)),
    ],
)
def test_recorded_metrics(kind: str, names: MetricNames, expected: OwnMetrics) -> None:
    text = recorded(kind, "metrics.txt")
    assert parse_own_metrics(text, names) == expected
    assert parse_own_metrics(text) == expected  # the names of all kinds never collide
    assert inflight_from_metrics(text) == expected.inflight
    # A kind's names do not read another kind's series.
    other = TGI_METRICS if kind == "vllm" else VLLM_METRICS
    assert parse_own_metrics(text, other) == OwnMetrics()


def test_series_are_summed_over_models_and_engines() -> None:
    assert parse_own_metrics(VLLM) == OwnMetrics(inflight=5.0, waiting=7.0)


@pytest.mark.parametrize("text", ["", "<html>not metrics</html>", "{broken"])
def test_not_metrics_is_no_figures(text: str) -> None:
    assert parse_own_metrics(text) == OwnMetrics(None, None, None)


def untracked(proxy: str) -> dict[str, float]:
    text = httpx.get(f"{proxy}/metrics").text
    return {
        s.labels["type"]: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "energy_proxy_backend_untracked_tokens"
    }


def test_untracked_tokens_show_traffic_that_bypasses_the_proxy(
    proxy: str, fake: tuple[Any, FakeState]
) -> None:
    _, state = fake
    deadline = time.monotonic() + 10
    while untracked(proxy) != {"prompt": 0.0, "completion": 0.0}:
        assert time.monotonic() < deadline, untracked(proxy)
        time.sleep(0.05)
    for stream in (False, True):
        r = httpx.post(
            f"{proxy}/v1/chat/completions",
            json={
                "model": "fake-model",
                "messages": [{"role": "user", "content": "one two three"}],
                "max_tokens": 4,
                "stream": stream,
            },
        )
        assert r.status_code == 200
    # Once the answers are in, both sides agree again (while a request runs the backend
    # may be ahead: it counts tokens as it makes them, the proxy when a request ends).
    while untracked(proxy) != {"prompt": 0.0, "completion": 0.0}:
        assert time.monotonic() < deadline, untracked(proxy)
        time.sleep(0.05)
    # Someone talks to the backend directly: 5 prompt and 9 completion tokens.
    state.prompt_tokens_served += 5
    state.completion_tokens_served += 9
    while untracked(proxy) != {"prompt": 5.0, "completion": 9.0}:
        assert time.monotonic() < deadline + 10, untracked(proxy)
        time.sleep(0.05)
    # The backend restarts: its counters fall, and the cross-check starts again from there.
    state.prompt_tokens_served, state.completion_tokens_served = 0, 0
    while untracked(proxy) != {"prompt": 0.0, "completion": 0.0}:
        assert time.monotonic() < deadline + 20, untracked(proxy)
        time.sleep(0.05)


def test_a_stream_its_client_cut_off_is_no_untracked_work(
    fake_server: str, fake: tuple[Any, FakeState], tmp_path: Path
) -> None:
    # A vLLM-kind backend: its /tokenize counts the prompt of a stream that brought no
    # usage. The client hangs up mid-stream: the backend has read the prompt and made
    # some tokens; the proxy must count that prompt too, or every hang-up would read as
    # traffic around the proxy.
    _, state = fake
    backends = [{"name": "fake", "url": fake_server, "kind": "vllm"}]
    with serve_proxy(tmp_path, fake_server, backend_metrics_s=0.05, backends=backends) as proxy:
        deadline = time.monotonic() + 10
        while untracked(proxy) != {"prompt": 0.0, "completion": 0.0}:
            assert time.monotonic() < deadline, untracked(proxy)
            time.sleep(0.05)
        prompt = "one two three four five six seven"
        with httpx.stream(
            "POST",
            f"{proxy}/v1/completions",
            json={"model": "fake-model", "prompt": prompt, "max_tokens": 200, "stream": True},
            headers={"x-fake-token-delay-s": "0.02", "x-request-id": "cut-1"},
        ) as r:
            lines = r.iter_lines()
            assert sum(1 for _, line in zip(range(6), lines, strict=False) if line) >= 3
        assert wait_for(lambda: state.abandoned == 1)
        assert wait_for(lambda: httpx.get(f"{proxy}/v1/energy/requests/cut-1").status_code == 200)
        record = httpx.get(f"{proxy}/v1/energy/requests/cut-1").json()
        assert record["completion_tokens"] >= 1
        assert state.tokenize_calls == 1
        assert state.prompt_tokens_served == 7
        # Every prompt token is accounted; the completion side differs by exactly the
        # tokens the backend made that the hang-up left unread (none, or a few).
        expected_completion = float(state.completion_tokens_served - record["completion_tokens"])
        while untracked(proxy) != {"prompt": 0.0, "completion": expected_completion}:
            assert time.monotonic() < deadline + 10, (untracked(proxy), expected_completion)
            time.sleep(0.05)
        assert 0 <= expected_completion < 200 - record["completion_tokens"]
