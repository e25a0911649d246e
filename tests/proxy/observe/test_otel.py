"""OpenTelemetry against a real OTLP/HTTP receiver on 127.0.0.1 (tests/support/otlp.py,
decoding the protobuf as a collector does), through a real `energy-proxy serve`: a span
per request with the GenAI names and the energy under `energy_proxy.*`, its parent the
client's `traceparent`, the backend given the proxy's span as its parent; the request
metrics through OTLP; a collector that is down costs no request."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends.local.launch import ChildServer, free_port, proxy_server
from tests.support.fakes.openai_backend import FakeState
from tests.support.polling import wait_for

pytest.importorskip("opentelemetry.sdk", reason="the [otel] extra")
from tests.support.otlp import OtlpReceiver, attributes

SERVER = 2  # SpanKind.SPAN_KIND_SERVER in OTLP's protobuf


def _env() -> dict[str, str]:
    return {**os.environ, "OTEL_METRIC_EXPORT_INTERVAL": "300"}


def _traced_proxy(fake_server: str, tmp_path: Path, collector: str) -> ChildServer:
    """`energy-proxy serve` sending its spans and metrics to `collector` (not started)."""
    return proxy_server(
        fake_server,
        extra_args=[
            *("--power-source", "constant:50", "--db", str(tmp_path / "r.db")),
            *("--otlp-endpoint", collector),
        ],
        log_path=tmp_path / "proxy.log",
        env=_env(),
    )


def test_a_span_per_request_between_the_app_and_the_backend(
    fake: tuple[Any, FakeState], fake_server: str, tmp_path: Path
) -> None:
    _, state = fake
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    traceparent = f"00-{trace_id}-{parent_id}-01"
    with OtlpReceiver() as receiver:
        server = _traced_proxy(fake_server, tmp_path, receiver.url)
        with server, httpx.Client(base_url=server.url, timeout=30) as client:
            body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
            plain = client.post("/v1/chat/completions", json=body,
                                headers={"traceparent": traceparent})  # fmt: skip
            assert plain.status_code == 200
            with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True},
                               headers={"traceparent": traceparent}) as streamed:  # fmt: skip
                assert streamed.status_code == 200
                "".join(streamed.iter_text())
            assert wait_for(lambda: len(receiver.spans()) >= 2, timeout_s=20)
            assert wait_for(
                lambda: sum(p.as_double or p.as_int
                            for p in receiver.metric_points("energy_proxy.requests")) >= 2,
                timeout_s=20,
            )  # fmt: skip
    spans = receiver.spans()
    assert len(spans) == 2
    for span in spans:
        assert span.name == "chat fake-model"
        assert span.kind == SERVER
        assert span.trace_id.hex() == trace_id  # the app's trace
        assert span.parent_span_id.hex() == parent_id  # under the app's span
        a = attributes(span)
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.request.model"] == "fake-model"
        assert a["gen_ai.usage.output_tokens"] > 0
        assert a["gen_ai.usage.input_tokens"] > 0
        assert a["energy_proxy.joules"] > 0
        assert a["energy_proxy.method"]
        assert a["energy_proxy.category"]
        assert a["http.response.status_code"] == 200
    by_ttft = [attributes(s).get("gen_ai.server.time_to_first_token") for s in spans]
    assert sum(t is not None for t in by_ttft) == 1  # the streamed one saw its first token
    plain_span = next(s for s in spans if "gen_ai.server.time_to_first_token" not in attributes(s))
    assert attributes(plain_span)["energy_proxy.joules"] == pytest.approx(
        float(plain.headers["x-energy-joules"]), rel=1e-3
    )
    # The backend got the proxy's span as its parent, in the same trace.
    sent = [r["headers"].get("traceparent", "") for r in state.requests]
    proxy_ids = {s.span_id.hex() for s in spans}
    assert len(sent) == 2
    for tp in sent:
        _, tid, pid, _ = tp.split("-")
        assert tid == trace_id and pid in proxy_ids
    energy_points = list(receiver.metric_points("energy_proxy.request.energy"))
    assert energy_points and attributes(energy_points[-1])["model"] == "fake-model"


def test_a_collector_that_is_down_costs_no_request(fake_server: str, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    server = _traced_proxy(fake_server, tmp_path, dead)
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(20):
            assert client.post("/v1/chat/completions", json=body).status_code == 200

        def failed() -> float:
            text = client.get("/metrics").text
            line = next(
                (ln for ln in text.splitlines()
                 if ln.startswith("energy_proxy_otlp_spans_failed_total")), ""
            )  # fmt: skip
            return float(line.split()[-1]) if line else 0.0

        assert wait_for(lambda: failed() >= 20, timeout_s=30)


def test_without_the_sdk_asking_for_tracing_says_what_to_install(tmp_path: Path) -> None:
    import subprocess
    import sys

    # A Python that cannot import the SDK (its package shadowed by an empty one).
    shadow = tmp_path / "shadow" / "opentelemetry" / "sdk"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed here')\n")
    env = {**os.environ, "PYTHONPATH": f"{shadow.parent.parent}:{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve", "--backend", "http://127.0.0.1:9",
         "--db", str(tmp_path / "r.db"), "--otlp-endpoint", "http://127.0.0.1:4318"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "pip install 'energy-proxy[otel]'" in done.stderr


def test_only_the_variables_without_the_sdk_is_a_warning_not_a_stop(
    fake_server: str, tmp_path: Path
) -> None:
    # An operator (or vLLM's own setup) set OTEL_EXPORTER_OTLP_ENDPOINT; the proxy was
    # installed without the [otel] extra: it serves, and says why it does not trace.
    shadow = tmp_path / "shadow" / "opentelemetry" / "sdk"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed here')\n")
    env = {
        **os.environ,
        "PYTHONPATH": f"{shadow.parent.parent}:{os.environ.get('PYTHONPATH', '')}",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
    }
    log = tmp_path / "proxy.log"
    server = proxy_server(
        fake_server,
        extra_args=["--power-source", "constant:50", "--db", str(tmp_path / "r.db")],
        log_path=log,
        env=env,
    )
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert "running without tracing" in log.read_text()
