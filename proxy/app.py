"""The app factory: builds every part from `Settings` and wires them; no global state.

The outermost ASGI callable dispatches by path with one dict lookup: the metered routes
go to the raw relay (the hot path, proxy/relay/), everything else to a FastAPI app of
routers (proxy/api/), whose lifespan starts and stops the background tasks (the sampler's
tick, the backends' model refresh and metrics scrape, the live feed, the carbon figure,
retention). A finished request is one event for its observers (proxy/observe/).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from backends.backend import Backend
from backends.registry import BackendRegistry
from metering.carbon.electricitymaps import ElectricityMapsIntensity
from metering.carbon.intensity import IntensityProvider, RefreshingIntensity, StaticIntensity
from metering.carbon.sci import embodied_for_host
from metering.categories.classifier import PromptClassifier
from metering.meter import LEDGER_TICK_HZ, Meter, Plan
from metering.sources.base import PowerSource
from metering.sources.nvml import nvml_factory
from metering.sources.rapl import rapl_factory
from metering.sources.spec import parse_power_spec
from metering.store import RequestStore, StoreError
from proxy.api.access import Access
from proxy.api.energy import EnergyApi
from proxy.api.health import HealthApi, metrics_app, sidecar_metrics
from proxy.api.live import LiveApi
from proxy.api.models import ModelsApi
from proxy.asgi import Receive, Scope, Send, send_error
from proxy.auth import KeyRing
from proxy.budgets import Budget, BudgetBook
from proxy.carbon_client import HttpxFetch
from proxy.errors import HeadersTooLarge, MethodNotAllowed, ProxyError, error_body
from proxy.headers import client_request_id, header_limit_problem, header_value
from proxy.live.feed import LiveFeed
from proxy.observe.budget_metrics import BudgetUse
from proxy.observe.finished import Observer, Observers
from proxy.observe.metrics import ProxyMetrics
from proxy.observe.observers import LiveRequests, RequestLines, StoreRecords, TokenTallies
from proxy.observe.request_log import RequestLog
from proxy.observe.route_metrics import MarginalCost, RoutedRequests
from proxy.observe.startup import Figures, SourceLine, figures_of
from proxy.observe.tracing import (
    OtelMissing,
    SpansDropped,
    Tracing,
    unsupported_protocol,
    wanted,
)
from proxy.relay.exchange import id_headers_for
from proxy.relay.passthrough import Passthrough
from proxy.relay.path_rules import PathRules
from proxy.relay.route import METERED_PATHS, MeteredRoute, RelayContext
from proxy.relay.router import Router
from proxy.relay.upstream import UpstreamClient, make_upstream
from proxy.settings import ConfigError, Settings

log = logging.getLogger("energy_proxy")


def budget_book(
    keys: KeyRing, default: Budget | None, store: RequestStore, refresh_s: float
) -> BudgetBook | None:
    """Each key's budget (its own, else the default); None where no key has one."""
    budgets = {
        k.name: b
        for k in keys.keys
        # The default is not the operator's: admin keys have only a budget of their own.
        if (b := k.budget or (None if k.admin else default)) is not None
    }
    if not budgets:
        return None
    return BudgetBook(budgets, store.tenants_usage, refresh_s=refresh_s)


def tracing_from(endpoint: str | None) -> Tracing | None:
    """OpenTelemetry when asked for (`--otlp-endpoint`, or the OTEL_* variables); raises
    ConfigError where the SDK is not installed."""
    if not wanted(endpoint):
        return None
    protocol = unsupported_protocol()
    if protocol is not None:
        log.warning(
            "OpenTelemetry: %s is not supported: spans and metrics go over OTLP/HTTP "
            "(protobuf, port 4318); set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf",
            protocol,
        )
    try:
        return Tracing.build(endpoint)
    except OtelMissing as e:
        if endpoint:
            raise ConfigError(str(e)) from e
        # Only the variables (an operator's, or vLLM's own): a warning, not a stop.
        log.warning("%s; running without tracing", e)
        return None


class EnergyProxyApp:
    """The ASGI app. `startup()`/`shutdown()` also run through the ASGI lifespan."""

    def __init__(
        self,
        settings: Settings,
        ctx: RelayContext,
        api: FastAPI,
        *,
        store: RequestStore,
        live: LiveFeed,
        metrics: ProxyMetrics,
        request_log: RequestLog | None = None,
    ) -> None:
        self.settings = settings
        self.ctx = ctx
        self.api = api
        self.store = store
        self.live = live
        self.metrics = metrics
        self.request_log = request_log
        self._metered = MeteredRoute(ctx)
        self._passthrough = Passthrough(ctx, PathRules(tuple(settings.passthrough)))
        self._own_routes = list(api.router.routes)
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics_server: _QuietServer | None = None
        self._metrics_task: asyncio.Task[None] | None = None

    @property
    def meter(self) -> Meter:
        return self.ctx.meter

    def figures(self) -> Figures:
        """Every figure the proxy measures and counts with (the startup line)."""
        sources = [
            SourceLine(st.source.name, st.source.method, str(getattr(st.source, "hardware", "")))
            for st in self.meter.sampler.states
        ]
        return figures_of(
            self.settings,
            sources=sources,
            embodied=self.meter.embodied.basis,
            store=self.store.where,
            request_log=self.request_log is not None,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope["path"] in METERED_PATHS:
                method = scope["method"]
                if method == "POST":
                    await self._metered(scope, receive, send)
                elif method == "OPTIONS":  # a browser's preflight: the backend answers it
                    await self._passthrough(scope, receive, send)
                else:
                    await self._method_not_allowed(scope, send)
                return
            if not self._own_path(scope):
                await self._passthrough(scope, receive, send)
                return
            client_id, _ = client_request_id(header_value(scope["headers"], b"x-request-id"))
            rid = (client_id or self.ctx.ids.new()).encode()
            problem = header_limit_problem(scope["headers"])
            if problem:
                await send_error(send, HeadersTooLarge(problem), [(b"x-request-id", rid)])
                return

            async def send_with_id(message: Any) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), (b"x-request-id", rid)]
                await send(message)

            await self.api(scope, receive, send_with_id)
            return
        await self.api(scope, receive, send)

    def _own_path(self, scope: Scope) -> bool:
        """Whether one of the proxy's own endpoints serves this path (by any method)."""
        return any(r.matches(scope)[0] != Match.NONE for r in self._own_routes)

    async def _method_not_allowed(self, scope: Scope, send: Send) -> None:
        _, _, id_headers = id_headers_for(self.ctx.ids, scope["headers"])
        self.ctx.observers.rejected(405)
        exc = MethodNotAllowed(f"{scope['path']} takes POST, not {scope['method']}")
        await send_error(send, exc, [*id_headers, (b"allow", b"POST, OPTIONS")])

    async def startup(self) -> None:
        ctx, settings = self.ctx, self.settings
        await ctx.upstream.start()
        await ctx.registry.refresh()
        self._tasks = [
            asyncio.create_task(ctx.meter.sampler.run(min(settings.sample_hz, LEDGER_TICK_HZ))),
            asyncio.create_task(ctx.registry.run(settings.models_refresh_s)),
            asyncio.create_task(
                ctx.registry.run_own_metrics(
                    settings.backend_metrics_s,
                    settings.backend_metrics_fast_s,
                    ctx.meter.gauges_wanted,
                )
            ),
            asyncio.create_task(self._metered.watch_slow_clients()),
            asyncio.create_task(self.live.run()),
        ]
        if settings.metrics_listen is not None:
            host, _, port = settings.metrics_listen.rpartition(":")
            config = uvicorn.Config(
                metrics_app(
                    ctx.meter, self.metrics.registry,
                    sidecar_metrics(ctx.registry) if settings.pass_backend_metrics else None,
                ),
                host=host.strip("[]"),
                port=int(port), lifespan="off", access_log=False, log_level="warning",
            )  # fmt: skip
            self._metrics_server = _QuietServer(config)
            self._metrics_task = asyncio.create_task(self._metrics_server.serve())
        if self.request_log is not None:
            self._tasks.append(asyncio.create_task(self.request_log.run()))
        if self.ctx.budgets is not None:
            # What the store holds first (a restart must not reset anyone's use), then
            # read again every --budget-refresh-s.
            # Records replayed from the journal are written first, or the store would
            # hold them twice (written before, and queued again) for the first read.
            await asyncio.to_thread(self.store.flush, 10.0)
            await self.ctx.budgets.refresh()
            self._tasks.append(asyncio.create_task(self.ctx.budgets.run()))
        for provider in (ctx.meter.intensity, *ctx.router.intensities.values()):
            if isinstance(provider, RefreshingIntensity):
                self._tasks.append(asyncio.create_task(provider.run()))
        if settings.retention_days > 0:
            self._tasks.append(asyncio.create_task(self._prune_forever()))

    async def _prune_forever(self, period_s: float = 3600.0) -> None:
        """Retention: drop records older than --retention-days, now and then hourly."""
        keep_s = self.settings.retention_days * 86_400.0
        while True:
            try:
                removed = await asyncio.to_thread(self.store.prune, keep_s)
            except StoreError as exc:
                log.warning("pruning the request store failed: %s", exc)
            else:
                if removed:
                    log.info(
                        "pruned %d request records older than %d days",
                        removed,
                        self.settings.retention_days,
                    )
            await asyncio.sleep(period_s)

    def close_live_streams(self) -> None:
        """The server is stopping: end the live-event streams, so they do not hold its
        graceful shutdown (`energy-proxy serve` calls this before waiting for requests)."""
        self.live.hub.close()

    async def shutdown(self) -> None:
        self.close_live_streams()
        if self._metrics_server is not None and self._metrics_task is not None:
            # Let it close its socket: a cancelled server would leave it open.
            self._metrics_server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._metrics_task, 10)
            self._metrics_task = None
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
            except Exception:  # a task that died must not stop the rest of the shutdown
                log.exception("a background task had failed")
        self._tasks = []
        sampler = self.ctx.meter.sampler
        try:
            # A last reading, so energy drawn up to the end is counted.
            sampler.read_all()
            if self.request_log is not None:
                self.request_log.flush()
            await self.ctx.upstream.aclose()
            sampler.close()
            # Every answered request's record reaches the disk before the process exits.
            await asyncio.to_thread(self.store.close)
        finally:
            if self.ctx.tracing is not None:
                await asyncio.to_thread(self.ctx.tracing.shutdown)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[EnergyProxyApp]:
        """Start and stop around a block (tests that skip the ASGI lifespan use this)."""
        await self.startup()
        try:
            yield self
        finally:
            await self.shutdown()


class _QuietServer(uvicorn.Server):
    """A second server in the main one's process and loop: the main one handles signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def create_app(
    settings: Settings,
    *,
    upstream: UpstreamClient | None = None,
    sources: Sequence[PowerSource] | None = None,
    intensity: IntensityProvider | None = None,
    clock: Callable[[], float] = time.monotonic,
    request_log: RequestLog | None = None,
    store: RequestStore | None = None,
) -> EnergyProxyApp:
    """Build the proxy. Inject `upstream`, `sources` or `clock` to test without hardware.

    Raises StoreError when the request store cannot be opened (a clear start-up error).
    """
    if store is None:
        store = RequestStore.open(
            settings.db,
            max_mb=settings.db_max_mb,
            max_queue_records=settings.db_queue_records,
            journal=settings.journal,
        )
    if sources is None:
        sources = parse_power_spec(
            settings.power_source,
            start_s=clock(),
            factories={"nvml": nvml_factory, "rapl": rapl_factory},
        )
    intensity = intensity or intensity_from(settings)
    meter = Meter.build(
        sources,
        [Plan(b.name, b.gpus, b.max_running, b.prefill_chunk_tokens) for b in settings.backends],
        intensity,
        idle_watts=settings.idle_watts_fixed,
        clock=clock,
        sample_hz=settings.sample_hz,
        attribution=settings.attribution,
        pue=settings.pue,
        embodied=embodied_for_host(
            sum(1 for s in sources if s.domain == "gpu"),
            settings.embodied_kgco2eq,
            settings.lifespan_years,
        ),
        fit_in_thread=True,  # the fit's arithmetic stays off the event loop
    )
    if upstream is None:
        upstream = make_upstream(settings.upstream_client, settings.backend_timeout)
    registry = BackendRegistry(
        [Backend(b.to_config()) for b in settings.backends],
        upstream,
        clock=clock,
        on_own_metrics=meter.learn,
    )
    meter.on_gauges_wanted = registry.wake_gauges
    zones = backend_intensities(settings)
    for name, provider in zones.items():
        meter.lane(name).intensity = provider
    router = Router(
        meter,
        policy=settings.route,
        per_model=settings.routes,
        explore=settings.route_explore,
        max_waiting=settings.route_max_waiting,
        intensities=zones,
    )
    metrics = ProxyMetrics(
        CollectorRegistry(auto_describe=True),
        meter.sampler,
        intensity.current,
        registry.backends,
        store.status,
        meter.cost_models,
        lambda name: (meter.untracked_requests(name), meter.untracked_joules(name)),
    )
    live = LiveFeed(meter.sampler, intensity, inflight=registry.inflight)
    metrics.watch_live_streams(live.hub)
    # In this order: the metrics first, the slowest (the log) last.
    metrics.registry.register(MarginalCost(router, registry.backends))
    observers: list[Observer] = [
        metrics, RoutedRequests(metrics.registry), router, TokenTallies(), StoreRecords(store),
        LiveRequests(live),
    ]  # fmt: skip
    if request_log is not None:
        observers.append(RequestLines(request_log))
    tracing = tracing_from(settings.otlp_endpoint)
    if tracing is not None:
        observers.append(tracing)
        metrics.registry.register(SpansDropped(tracing.spans))
    keys = KeyRing.from_settings(settings.api_keys, settings.keys)
    budgets = budget_book(keys, settings.budget, store, settings.budget_refresh_s)
    if budgets is not None:
        observers.append(budgets)
        metrics.registry.register(BudgetUse(budgets))
    ctx = RelayContext(
        registry=registry,
        upstream=upstream,
        meter=meter,
        observers=Observers(observers),
        keys=keys,
        max_body_bytes=settings.max_body_bytes,
        router=router,
        classifier=PromptClassifier(settings.categories),
        client_timeout_s=settings.client_timeout,
        tracing=tracing,
        budgets=budgets,
    )
    access = Access(keys)
    api = _api(
        HealthApi(
            registry, meter, store, metrics.registry, access,
            protect_metrics=settings.protect_metrics,
            metrics_elsewhere=settings.metrics_listen is not None,
            backend_text=sidecar_metrics(registry) if settings.pass_backend_metrics else None,
            routing=router.describe,
        ),
        ModelsApi(registry, access),
        EnergyApi(
            store, access, hardware=meter.hardware(), summary_window=settings.summary_window,
            budgets=budgets,
        ),
        LiveApi(live, access),
    )  # fmt: skip
    app = EnergyProxyApp(
        settings, ctx, api, store=store, live=live, metrics=metrics, request_log=request_log
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with app.running():
            yield

    api.router.lifespan_context = lifespan
    return app


def intensity_from(settings: Settings) -> IntensityProvider:
    """Electricity Maps when a place and key are configured, else the static figure."""
    if not settings.live_carbon:
        return StaticIntensity(settings.carbon_intensity)
    return _electricitymaps(
        settings, zone=settings.carbon_zone, lat=settings.carbon_lat, lon=settings.carbon_lon
    )


def backend_intensities(settings: Settings) -> dict[str, IntensityProvider]:
    """The grid intensity of each backend that names its own zone or figure."""
    out: dict[str, IntensityProvider] = {}
    for b in settings.backends:
        if b.carbon_intensity is not None:
            out[b.name] = StaticIntensity(b.carbon_intensity)
        elif b.carbon_zone is not None:
            out[b.name] = _electricitymaps(settings, zone=b.carbon_zone)
    return out


def _electricitymaps(
    settings: Settings,
    *,
    zone: str | None = None,
    lat: float | None = None,
    lon: float | None = None,
) -> IntensityProvider:
    assert settings.electricitymaps_api_key is not None  # Settings checks it
    return ElectricityMapsIntensity(
        settings.electricitymaps_url,
        settings.electricitymaps_api_key,
        zone=zone,
        lat=lat,
        lon=lon,
        static_g_per_kwh=settings.carbon_intensity,
        refresh_s=settings.carbon_refresh_s,
        max_backoff_s=min(settings.carbon_refresh_s, 900.0),
        fetch=HttpxFetch(),
    )


def _api(*routers: HealthApi | ModelsApi | EnergyApi | LiveApi) -> FastAPI:
    """The FastAPI app of the proxy's own endpoints; errors in the OpenAI shape."""
    api = FastAPI(title="energy-proxy", docs_url=None, redoc_url=None, openapi_url=None)

    async def proxy_error(_: Any, exc: Exception) -> Response:
        assert isinstance(exc, ProxyError)
        return Response(exc.body(), status_code=exc.status, media_type="application/json")

    async def http_error(_: Any, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        body = error_body(str(exc.detail), "invalid_request_error", str(exc.status_code))
        return Response(body, status_code=exc.status_code, media_type="application/json")

    api.add_exception_handler(ProxyError, proxy_error)
    api.add_exception_handler(StarletteHTTPException, http_error)
    for r in routers:
        api.include_router(r.router())
    return api
