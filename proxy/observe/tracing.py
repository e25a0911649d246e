"""OpenTelemetry: a server span for each metered request, and the request metrics through
OTLP as well as Prometheus. Optional (`pip install 'energy-proxy[otel]'`) and off unless
`--otlp-endpoint` or the standard `OTEL_EXPORTER_OTLP_ENDPOINT` says where to send.

The span carries the GenAI conventions' names (`gen_ai.operation.name`,
`gen_ai.request.model`, `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`,
`gen_ai.server.time_to_first_token`) and the energy under `energy_proxy.*`, one attribute
per field of the `energy` object the client got (docs/INTERFACE.md, "OpenTelemetry"). Its
parent is the client's W3C `traceparent`; the backend gets the proxy's span as its parent,
so the proxy sits between the app's span and vLLM's own.

Nothing is exported on the request path: ended spans go into a bounded queue that a
thread sends in batches; a collector that is down or slow costs the spans that do not
fit, counted (`energy_proxy_otlp_spans_dropped_total`), never a request's time.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from proxy.asgi import RawHeaders
from proxy.observe.finished import RequestFinished

log = logging.getLogger("energy_proxy.otel")

SERVICE_NAME = "energy-proxy"
ATTRIBUTE_PREFIX = "energy_proxy."
QUEUE_SPANS = 4096
BATCH_SPANS = 512
EXPORT_EVERY_S = 1.0
EXPORT_TIMEOUT_S = 5.0
# The API a request called -> the GenAI conventions' operation name.
OPERATIONS = {
    "chat": "chat",
    "messages": "chat",
    "responses": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
}
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


class OtelMissing(RuntimeError):
    """Tracing was asked for, and the OpenTelemetry SDK is not installed."""


def wanted(endpoint: str | None, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether to export: an endpoint given, or the standard variables set (and
    `OTEL_SDK_DISABLED` not true)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(endpoint) or any(environ.get(v) for v in _ENDPOINT_VARS)


def unsupported_protocol(environ: Mapping[str, str] = os.environ) -> str | None:
    """The OTLP protocol the variables ask for where it is not OTLP/HTTP with protobuf
    (the one exporter installed), else None."""
    for var in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = environ.get(var, "").strip().lower()
        if value and value != "http/protobuf":
            return f"{var}={value}"
    return None


class SpanQueue:
    """A span processor that never blocks the request path: ended spans into a bounded
    queue; a thread exports them in batches. Spans that do not fit are dropped, counted."""

    def __init__(self, exporter: Any, max_spans: int = QUEUE_SPANS) -> None:
        self._exporter = exporter
        self._max = max_spans
        self._queue: deque[Any] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.dropped = 0
        self.exported = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="energy-proxy-otlp", daemon=True)
        self._thread.start()

    # SpanProcessor
    def on_start(self, span: Any, parent_context: Any = None) -> None:
        return None

    def on_end(self, span: Any) -> None:
        if len(self._queue) >= self._max:
            self.dropped += 1
            return
        self._queue.append(span)
        if len(self._queue) >= BATCH_SPANS:
            self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(EXPORT_EVERY_S)
            self._wake.clear()
            self._export_all()
        self._export_all()

    def _export_all(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(BATCH_SPANS, len(self._queue)))]
            try:
                result = self._exporter.export(batch)
            except Exception as e:  # a collector's failure is the batch's, never ours
                result = None
                log.debug("exporting %d spans failed: %s", len(batch), e)
            if getattr(result, "name", "") == "SUCCESS":
                self.exported += len(batch)
            else:
                self.failed += len(batch)
                if self.failed == len(batch):  # the first failure only: no flood
                    log.warning("the OTLP collector did not take %d spans", len(batch))

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(EXPORT_TIMEOUT_S + 1.0)
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        deadline = time.monotonic() + timeout_millis / 1000.0
        self._wake.set()
        while self._queue and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue


class Tracing:
    """The tracer, the propagator and the OTLP instruments, built by `Tracing.build`."""

    def __init__(self, tracer: Any, propagator: Any, spans: SpanQueue, providers: Sequence[Any],
                 instruments: dict[str, Any]) -> None:  # fmt: skip
        self._tracer = tracer
        self._propagator = propagator
        self.spans = spans
        self._providers = providers
        self._i = instruments
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self._server, self._status, self._error = SpanKind.SERVER, Status, StatusCode.ERROR

    @classmethod
    def build(cls, endpoint: str | None) -> Tracing:
        """Exporters to `endpoint` (an OTLP/HTTP base URL: `/v1/traces` and `/v1/metrics`
        are added), or where the `OTEL_EXPORTER_OTLP_*` variables say."""
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError as e:
            raise OtelMissing(
                "--otlp-endpoint (or OTEL_EXPORTER_OTLP_ENDPOINT) needs the OpenTelemetry SDK: "
                f"pip install 'energy-proxy[otel]' ({e})"
            ) from e
        base = endpoint.rstrip("/") if endpoint else None
        env = os.environ
        named = env.get("OTEL_SERVICE_NAME") or "service.name" in env.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""
        )
        # The variables' own name wins (Resource.create reads them); ours otherwise.
        resource = Resource.create({} if named else {"service.name": SERVICE_NAME})
        span_exporter = OTLPSpanExporter(
            endpoint=f"{base}/v1/traces" if base else None, timeout=EXPORT_TIMEOUT_S
        )
        # The SDK's processor interface, for the hooks SpanQueue leaves at their defaults.
        processor = type("SpanQueueProcessor", (SpanQueue, SpanProcessor), {})
        spans = processor(span_exporter)
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(spans)
        metric_exporter = OTLPMetricExporter(
            endpoint=f"{base}/v1/metrics" if base else None, timeout=EXPORT_TIMEOUT_S
        )
        # Metrics where an endpoint for them is known (only a traces endpoint set: none).
        readers = (
            [PeriodicExportingMetricReader(metric_exporter)]
            if base
            or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
            else []
        )
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        meter = meter_provider.get_meter("energy_proxy")
        instruments = {
            "requests": meter.create_counter(
                "energy_proxy.requests", "{request}", "Requests answered, by final status."
            ),
            "energy": meter.create_histogram(
                "energy_proxy.request.energy", "J", "Energy attributed per request."
            ),
            "co2": meter.create_histogram(
                "energy_proxy.request.co2eq", "g", "Operational emissions per request."
            ),
            "duration": meter.create_histogram(
                "energy_proxy.request.duration", "s", "Request duration through the proxy."
            ),
            "tokens": meter.create_counter(
                "energy_proxy.tokens", "{token}", "Tokens processed, by type."
            ),
        }
        tracer = tracer_provider.get_tracer("energy_proxy")
        return cls(tracer, TraceContextTextMapPropagator(), spans,
                   (tracer_provider, meter_provider), instruments)  # fmt: skip

    # --- the request path ----------------------------------------------------------------

    def start(self, headers: RawHeaders, endpoint: str, model: str) -> Any:
        """A server span for a request, its parent the client's `traceparent` if any."""
        parents = [v for k, v in headers if k.lower() == b"traceparent"]
        states = [v for k, v in headers if k.lower() == b"tracestate"]
        parent = None
        if len(parents) == 1:  # two traceparents are no parent (W3C Trace Context)
            carrier = {"traceparent": parents[0].decode("latin-1")}
            if states:  # repeated tracestate headers are one list
                carrier["tracestate"] = ",".join(v.decode("latin-1") for v in states)
            parent = self._propagator.extract(carrier)
        operation = OPERATIONS.get(endpoint, endpoint)
        return self._tracer.start_span(
            f"{operation} {model}",
            context=parent,
            kind=self._server,
            attributes={"gen_ai.operation.name": operation, "gen_ai.request.model": model},
        )

    def propagate(self, span: Any, headers: list[tuple[bytes, bytes]]) -> None:
        """The backend's request headers with this span as the parent: the client's own
        `traceparent`/`tracestate` replaced."""
        from opentelemetry.trace import set_span_in_context

        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=set_span_in_context(span))
        headers[:] = [
            (k, v) for k, v in headers if k.lower() not in (b"traceparent", b"tracestate")
        ]
        headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in carrier.items())

    def finished(self, event: RequestFinished) -> None:
        """An observer: the span's attributes and end; the OTLP metrics."""
        report, energy = event.report, event.energy
        span = event.span
        if span is not None:
            attrs: dict[str, Any] = {
                f"{ATTRIBUTE_PREFIX}{k}": v
                for k, v in energy.items()
                if isinstance(v, str | int | float | bool)
            }
            attrs[f"{ATTRIBUTE_PREFIX}category"] = report.category
            attrs[f"{ATTRIBUTE_PREFIX}backend"] = event.backend.name
            if event.tenant:
                attrs[f"{ATTRIBUTE_PREFIX}tenant"] = event.tenant
            if report.tokens.prompt is not None:
                attrs["gen_ai.usage.input_tokens"] = report.tokens.prompt
            attrs["gen_ai.usage.output_tokens"] = report.tokens.completion
            if event.first_token_s is not None:
                attrs["gen_ai.server.time_to_first_token"] = event.first_token_s
            attrs["http.response.status_code"] = event.status
            span.set_attributes(attrs)
            if event.status >= 500:
                span.set_status(self._status(self._error))
            span.end()
        labels = {
            "model": event.model_label,
            "category": report.category,
            "backend": event.backend.name,
            "endpoint": report.endpoint,
        }
        i = self._i
        i["requests"].add(1, {**labels, "status": str(event.status)})
        i["energy"].record(report.energy_j, labels)
        i["co2"].record(report.co2eq_g, labels)
        i["duration"].record(report.duration_s, labels)
        if report.tokens.prompt:
            i["tokens"].add(report.tokens.prompt, {**labels, "type": "prompt"})
        if report.tokens.completion:
            i["tokens"].add(report.tokens.completion, {**labels, "type": "completion"})

    def shutdown(self) -> None:
        """Send what is queued (bounded by the exporters' timeouts) and stop."""
        for provider in self._providers:
            try:
                provider.shutdown()
            except Exception as e:  # shutting down: a collector's failure is only logged
                log.warning("OpenTelemetry shutdown: %s", e)


class SpansDropped(Collector):
    """`energy_proxy_otlp_spans_dropped_total`: spans the queue had no room for;
    `energy_proxy_otlp_spans_failed_total`: spans the collector did not take."""

    def __init__(self, spans: SpanQueue) -> None:
        self._spans = spans

    def collect(self) -> Any:
        c = CounterMetricFamily(
            "energy_proxy_otlp_spans_dropped",
            "Spans not exported: the queue to the OTLP collector was full.",
        )
        c.add_metric([], float(self._spans.dropped))
        yield c
        f = CounterMetricFamily(
            "energy_proxy_otlp_spans_failed",
            "Spans the OTLP collector did not take (down, refusing, or too slow).",
        )
        f.add_metric([], float(self._spans.failed))
        yield f
