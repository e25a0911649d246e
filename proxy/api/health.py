"""`/healthz` (liveness), `/readyz` (readiness, with what each part reports) and `/metrics`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from backends.registry import BackendRegistry
from metering.carbon.electricitymaps import ElectricityMapsIntensity
from metering.meter import Meter
from metering.store import RequestStore
from proxy.api.access import Access
from proxy.errors import NotFound

# The backend's own series, read when /metrics is (--pass-backend-metrics); None: not.
BackendText = Callable[[], Awaitable[str | None]]


def sidecar_metrics(registry: BackendRegistry) -> BackendText:
    """The one backend's own series, read at each scrape (a sidecar's router reads one
    metrics path per endpoint: its queue and KV-cache scorers need the backend's)."""
    (backend,) = registry.backends

    async def read() -> str | None:
        return await registry.metrics_text(backend)

    return read


async def metrics_response(
    meter: Meter, registry: CollectorRegistry, backend_text: BackendText | None = None
) -> Response:
    """`/metrics`: energy totals and power as of now, not the last tick (a read costs
    microseconds); then the backend's own series as it serves them, when passed through."""
    meter.sampler.read_all()
    body = generate_latest(registry)
    if backend_text is not None:
        own = await backend_text()
        if own:
            body += own.encode("utf-8") + (b"" if own.endswith("\n") else b"\n")
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def metrics_app(
    meter: Meter, registry: CollectorRegistry, backend_text: BackendText | None = None
) -> FastAPI:
    """`/metrics` alone, for `--metrics-listen` (a port that only Prometheus reaches)."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    async def metrics() -> Response:
        return await metrics_response(meter, registry, backend_text)

    app.add_api_route("/metrics", metrics, methods=["GET"])
    return app


class HealthApi:
    def __init__(
        self,
        backends: BackendRegistry,
        meter: Meter,
        store: RequestStore,
        metrics_registry: CollectorRegistry,
        access: Access,
        *,
        protect_metrics: bool = False,
        metrics_elsewhere: bool = False,
        backend_text: BackendText | None = None,
        routing: Callable[[str], dict[str, object]] | None = None,
    ) -> None:
        self.backends = backends
        self.meter = meter
        self.store = store
        self.metrics_registry = metrics_registry
        self.access = access
        self.protect_metrics = protect_metrics
        self.metrics_elsewhere = metrics_elsewhere
        self.backend_text = backend_text
        self.routing = routing

    def router(self) -> APIRouter:
        r = APIRouter()
        r.add_api_route("/healthz", self.healthz, methods=["GET"])
        r.add_api_route("/readyz", self.readyz, methods=["GET"])
        r.add_api_route("/metrics", self.metrics, methods=["GET"])
        return r

    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    def _untracked(self, backend: str) -> dict[str, float]:
        """Work the backend ran that the proxy did not send: how many requests now (its
        gauges' count beyond the proxy's own) and their joules so far."""
        return {
            "requests": self.meter.untracked_requests(backend),
            "joules": self.meter.untracked_joules(backend),
        }

    async def readyz(self) -> JSONResponse:
        models = self.meter.cost_models()
        backends = [
            b.describe()
            | ({"cost_model": models[b.name]} if b.name in models else {})
            | {"untracked": self._untracked(b.name)}
            | ({"routing": self.routing(b.name)} if self.routing is not None else {})
            for b in self.backends.backends
        ]
        sources: list[dict[str, Any]] = [
            {
                "name": st.source.name,
                "method": st.source.method,
                "ok": st.ok,
                "hardware": str(getattr(st.source, "hardware", "") or ""),
            }
            | ({"error": st.last_error} if not st.ok else {})
            for st in self.meter.sampler.states
        ]
        ready = all(b["ready"] for b in backends) and any(s["ok"] for s in sources)
        # The carbon figure never makes the proxy unready: it degrades to cached/fallback.
        intensity = self.meter.intensity
        carbon = intensity.current().to_dict()
        if isinstance(intensity, ElectricityMapsIntensity) and intensity.failures:
            carbon["error"] = intensity.last_error
        # The other figures of SCI: the facility's PUE and the embodied figure in use.
        carbon["pue"] = self.meter.pue
        carbon["embodied"] = self.meter.embodied.to_dict()
        # Nor does the store: a failing database costs records (counted), never answers.
        return JSONResponse(
            {
                "ready": ready,
                "backends": backends,
                "power_sources": sources,
                "carbon": carbon,
                "store": self.store.status().to_dict(),
            },
            status_code=200 if ready else 503,
        )

    async def metrics(self, request: Request) -> Response:
        if self.metrics_elsewhere:
            raise NotFound("/metrics is served on its own address (--metrics-listen)")
        if self.protect_metrics:
            self.access.caller(request, admin=True)
        return await metrics_response(self.meter, self.metrics_registry, self.backend_text)
