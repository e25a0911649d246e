"""The app factory: builds every part from `Settings` and wires them; no global state.

The outermost ASGI callable dispatches by path with one dict lookup: the metered routes
go to the raw relay (the hot path), everything else to a FastAPI app (health, readiness,
metrics, model list, energy records), whose lifespan starts and stops the background
tasks (the sampler's tick, the backends' model refresh).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from backends.fetch import Headers
from backends.registry import Backend, BackendRegistry
from metering.accounting.attribution import Attribution, EngineQueue
from metering.accounting.groups import bind_channels, gpu_share, time_channel
from metering.accounting.sampler import LEDGER_TICK_HZ, Sampler
from metering.carbon.electricitymaps import ElectricityMapsIntensity
from metering.carbon.intensity import IntensityProvider, RefreshingIntensity, StaticIntensity
from metering.carbon.sci import Embodied
from metering.categories.classifier import PromptClassifier
from metering.ratings.label import render_label
from metering.ratings.score import MIN_REQUESTS_FOR_RATING, rate
from metering.sources.base import PowerSource
from metering.sources.hardware import describe_hardware
from metering.sources.nvml import nvml_factory
from metering.sources.rapl import rapl_factory
from metering.sources.spec import parse_power_spec
from metering.store import RequestStore, StoreError
from metering.store.window import DEFAULT_WINDOW, Window, WindowError, parse_window
from proxy.auth import ApiKey, KeyRing
from proxy.errors import (
    BadRequest,
    Forbidden,
    HeadersTooLarge,
    NotFound,
    ProxyError,
    StoreUnavailable,
    TooManyStreams,
    Unauthorized,
    error_body,
)
from proxy.headers import client_request_id, header_limit_problem, header_value
from proxy.live.feed import LiveFeed
from proxy.live.page import LivePage
from proxy.live.stream import LiveStreamResponse, live_events
from proxy.observe.metrics import ProxyMetrics
from proxy.observe.request_log import RequestLog
from proxy.relay.route import METERED_PATHS, MeteredRoute, Receive, RelayContext, Scope, Send
from proxy.relay.upstream import UpstreamClient, make_upstream
from proxy.settings import Settings

log = logging.getLogger("energy_proxy")


class _LazyUpstream:
    """Forwards to the current upstream client, which exists only once the loop runs."""

    def __init__(self, current: Callable[[], UpstreamClient]) -> None:
        self._current = current

    async def get_json(self, url: str, timeout_s: float, headers: Headers = None) -> object:
        return await self._current().get_json(url, timeout_s, headers)

    async def get_text(self, url: str, timeout_s: float, headers: Headers = None) -> str:
        return await self._current().get_text(url, timeout_s, headers)

    async def post_json(
        self, url: str, body: object, timeout_s: float, headers: Headers = None
    ) -> object:
        return await self._current().post_json(url, body, timeout_s, headers)


class EnergyProxyApp:
    """The ASGI app. `startup()`/`shutdown()` also run through the ASGI lifespan."""

    def __init__(
        self,
        settings: Settings,
        ctx: RelayContext,
        api: FastAPI,
        make_client: Callable[[], UpstreamClient] | None,
        store: RequestStore,
    ) -> None:
        self.settings = settings
        self.ctx = ctx
        self.api = api
        self.store = store
        self._metered = MeteredRoute(ctx)
        ctx.registry.on_own_metrics = self._metered.learn_queue
        self._make_client = make_client
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics_server: _QuietServer | None = None
        self._metrics_task: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope["path"] in METERED_PATHS:
                await self._metered(scope, receive, send)
                return
            client_id, _ = client_request_id(header_value(scope["headers"], b"x-request-id"))
            rid = (client_id or self.ctx.ids.new()).encode()
            problem = header_limit_problem(scope["headers"])
            if problem:
                await _send_proxy_error(send, HeadersTooLarge(problem), rid)
                return

            async def send_with_id(message: Any) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), (b"x-request-id", rid)]
                await send(message)

            await self.api(scope, receive, send_with_id)
            return
        await self.api(scope, receive, send)

    async def startup(self) -> None:
        if self._make_client is not None:
            self.ctx.upstream = self._make_client()
        await self.ctx.registry.refresh()
        self._tasks = [
            asyncio.create_task(self.ctx.sampler.run(min(self.settings.sample_hz, LEDGER_TICK_HZ))),
            asyncio.create_task(self.ctx.registry.run(self.settings.models_refresh_s)),
            asyncio.create_task(self.ctx.registry.run_own_metrics(self.settings.backend_metrics_s)),
            asyncio.create_task(self._metered.watch_slow_clients()),
        ]
        if self.settings.metrics_listen is not None:
            host, _, port = self.settings.metrics_listen.rpartition(":")
            config = uvicorn.Config(
                metrics_app(self.ctx), host=host.strip("[]"), port=int(port),
                lifespan="off", access_log=False, log_level="warning",
            )  # fmt: skip
            self._metrics_server = _QuietServer(config)
            self._metrics_task = asyncio.create_task(self._metrics_server.serve())
        if self.ctx.request_log is not None:
            self._tasks.append(asyncio.create_task(self.ctx.request_log.run()))
        if self.ctx.live is not None:
            self._tasks.append(asyncio.create_task(self.ctx.live.run()))
        if isinstance(self.ctx.intensity, RefreshingIntensity):
            self._tasks.append(asyncio.create_task(self.ctx.intensity.run()))
        if self.settings.retention_days > 0:
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
        if self.ctx.live is not None:
            self.ctx.live.hub.close()

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
        # A last reading, so energy drawn up to the end is counted.
        self.ctx.sampler.read_all()
        if self.ctx.request_log is not None:
            self.ctx.request_log.flush()
        await self.ctx.upstream.aclose()
        self.ctx.sampler.close()
        # Every answered request's record reaches the disk before the process exits.
        await asyncio.to_thread(self.store.close)

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


class _Unstarted:
    """Placeholder upstream until startup creates the real one."""

    async def send(self, *a: Any, **k: Any) -> Any:
        raise RuntimeError("the app has not been started")

    async def get_json(self, url: str, timeout_s: float, headers: Headers = None) -> object:
        raise RuntimeError("the app has not been started")

    async def get_text(self, url: str, timeout_s: float, headers: Headers = None) -> str:
        raise RuntimeError("the app has not been started")

    async def post_json(
        self, url: str, body: object, timeout_s: float, headers: Headers = None
    ) -> object:
        raise RuntimeError("the app has not been started")

    async def aclose(self) -> None:
        return None


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
        )
    if sources is None:
        sources = parse_power_spec(
            settings.power_source,
            start_s=clock(),
            factories={"nvml": nvml_factory, "rapl": rapl_factory},
        )
    backend_gpus = {b.name: b.gpus for b in settings.backends}
    channels, warnings = bind_channels(sources, backend_gpus)
    # One time channel per distinct GPU group, for the embodied share (metering/carbon/sci.py).
    time_of = {name: time_channel(chans, sources) for name, chans in channels.items()}
    sampler = Sampler(
        sources,
        idle_watts=settings.idle_watts_fixed,
        clock=clock,
        time_channels=sorted(set(time_of.values())),
        fast_interval_s=1.0 / settings.sample_hz,
    )
    intensity = intensity or intensity_from(settings)
    metrics_registry = CollectorRegistry(auto_describe=True)
    backends = [
        Backend(
            name=b.name,
            url=b.url,
            kind=b.kind,
            api_key=b.api_key,
            forward_authorization=b.forward_authorization,
            gpus=b.gpus,
        )
        for b in settings.backends
    ]
    metrics = ProxyMetrics(metrics_registry, sampler, intensity.current, backends, store.status)
    for warning in warnings:
        log.warning("%s", warning)
    registry = BackendRegistry(backends, _LazyUpstream(lambda: ctx.upstream), clock=clock)
    ctx = RelayContext(
        registry=registry,
        upstream=upstream or _Unstarted(),
        sampler=sampler,
        intensity=intensity,
        metrics=metrics,
        categories=frozenset(settings.categories),
        classifier=PromptClassifier(settings.categories),
        max_body_bytes=settings.max_body_bytes,
        keys=KeyRing.from_settings(settings.api_keys, settings.keys),
        client_timeout_s=settings.client_timeout,
        pue=settings.pue,
        channels={name: (*chans, time_of[name]) for name, chans in channels.items()},
        resource_share={name: gpu_share(chans, sources) for name, chans in channels.items()},
        embodied=Embodied.from_kg_years(settings.embodied_kgco2eq, settings.lifespan_years),
        attribution=Attribution(settings.attribution),
        queues={b.name: EngineQueue(configured=b.max_running) for b in settings.backends},
        request_log=request_log,
        store=store,
    )
    ctx.live = LiveFeed(
        sampler, intensity, inflight=lambda: sum(b.inflight for b in registry.backends)
    )
    metrics.watch_live_streams(ctx.live.hub)
    make_client = None
    if upstream is None:
        kind, timeout_s = settings.upstream_client, settings.backend_timeout

        def make_client() -> UpstreamClient:
            return make_upstream(kind, timeout_s)

    api = _build_api(
        ctx,
        store,
        protect_metrics=settings.protect_metrics,
        metrics_elsewhere=settings.metrics_listen is not None,
        summary_window=settings.summary_window,
    )
    app = EnergyProxyApp(settings, ctx, api, make_client, store)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with app.running():
            yield

    api.router.lifespan_context = lifespan
    return app


def describe_sources(sampler: Sampler) -> str:
    """What the energy was measured on, for labels: the devices and their methods."""
    return describe_hardware(
        (st.source.name, str(getattr(st.source, "hardware", "") or ""), st.source.method)
        for st in sampler.states
    )


def intensity_from(settings: Settings) -> IntensityProvider:
    """Electricity Maps when a place and key are configured, else the static figure."""
    if not settings.live_carbon:
        return StaticIntensity(settings.carbon_intensity)
    assert settings.electricitymaps_api_key is not None  # Settings checks it
    return ElectricityMapsIntensity(
        settings.electricitymaps_url,
        settings.electricitymaps_api_key,
        zone=settings.carbon_zone,
        lat=settings.carbon_lat,
        lon=settings.carbon_lon,
        static_g_per_kwh=settings.carbon_intensity,
        refresh_s=settings.carbon_refresh_s,
        max_backoff_s=min(settings.carbon_refresh_s, 900.0),
    )


def metrics_response(ctx: RelayContext) -> Response:
    """`/metrics`: energy totals and power as of now, not the last tick (a read costs
    microseconds)."""
    ctx.sampler.read_all()
    return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def metrics_app(ctx: RelayContext) -> FastAPI:
    """`/metrics` alone, for `--metrics-listen` (a port that only Prometheus reaches)."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/metrics")
    async def metrics() -> Response:
        return metrics_response(ctx)

    return app


async def _send_proxy_error(send: Send, exc: ProxyError, rid: bytes) -> None:
    body = exc.body()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", rid),
    ]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _build_api(
    ctx: RelayContext,
    store: RequestStore,
    *,
    protect_metrics: bool = False,
    metrics_elsewhere: bool = False,
    summary_window: str = DEFAULT_WINDOW,
) -> FastAPI:
    hardware = describe_sources(ctx.sampler)
    api = FastAPI(title="energy-proxy", docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(ProxyError)
    async def _proxy_error(_: Any, exc: ProxyError) -> Response:
        return Response(exc.body(), status_code=exc.status, media_type="application/json")

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Any, exc: StarletteHTTPException) -> Response:
        body = error_body(str(exc.detail), "invalid_request_error", str(exc.status_code))
        return Response(body, status_code=exc.status_code, media_type="application/json")

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz() -> JSONResponse:
        backends = [b.describe() for b in ctx.registry.backends]
        sources = [
            {
                "name": st.source.name,
                "method": st.source.method,
                "ok": st.ok,
                "hardware": str(getattr(st.source, "hardware", "") or ""),
            }
            | ({"error": st.last_error} if not st.ok else {})
            for st in ctx.sampler.states
        ]
        ready = all(b["ready"] for b in backends) and any(s["ok"] for s in sources)
        # The carbon figure never makes the proxy unready: it degrades to cached/fallback.
        carbon = ctx.intensity.current().to_dict()
        if isinstance(ctx.intensity, ElectricityMapsIntensity) and ctx.intensity.failures:
            carbon["error"] = ctx.intensity.last_error
        # Nor does the store: a failing database costs records (counted), never answers.
        return JSONResponse(
            {
                "ready": ready,
                "backends": backends,
                "power_sources": sources,
                "carbon": carbon,
                "store": store.status().to_dict(),
            },
            status_code=200 if ready else 503,
        )

    def caller(request: Request, *, admin: bool = False) -> ApiKey | None:
        """The caller's key (None when the proxy has no keys): 401 without a valid one,
        403 when `admin` is needed and it is not an admin key."""
        if not ctx.keys.enabled:
            return None
        key = ctx.keys.identify(request.headers.get("authorization", "").encode("latin-1"))
        if key is None:
            raise Unauthorized("missing or invalid API key for this proxy")
        if admin and not key.admin:
            raise Forbidden("this endpoint needs an admin key")
        return key

    def tenant_of(key: ApiKey | None) -> str | None:
        """Whose records a caller may see: its own, or everyone's (admins, no keys)."""
        return None if key is None or key.admin else key.name

    @api.get("/metrics")
    async def metrics(request: Request) -> Response:
        if metrics_elsewhere:
            raise NotFound("/metrics is served on its own address (--metrics-listen)")
        if protect_metrics:
            caller(request, admin=True)
        return metrics_response(ctx)

    page = LivePage.load()

    @api.get("/")
    async def live_page() -> Response:
        """The live page. It holds no data: what it shows comes from the endpoints below,
        with the key the page asks for when the proxy has keys."""
        return Response(page.html, media_type="text/html; charset=utf-8", headers=page.headers())

    @api.get("/v1/energy/events")
    async def events_endpoint(request: Request) -> Response:
        """Server-sent events for the live page and anyone else (README "Live events")."""
        key = caller(request)
        tenant = tenant_of(key)
        feed = ctx.live
        if feed is None:
            raise NotFound("live events are off")
        problem = feed.hub.room_for(key.name if key is not None else "")
        if problem:
            raise TooManyStreams(problem)
        owner = key.name if key is not None else ""
        return LiveStreamResponse(live_events(feed, tenant, owner))

    @api.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        caller(request)
        return ctx.registry.merged_models()

    @api.get("/v1/energy/requests/{request_id}")
    async def energy_of(request: Request, request_id: str) -> dict[str, Any]:
        tenant = tenant_of(caller(request))
        if len(request_id) > 256:
            raise NotFound("no finished request with such a long id")
        try:
            found = await asyncio.to_thread(store.get, request_id, tenant)
        except StoreError as exc:
            raise StoreUnavailable(str(exc)) from None
        if found is None:
            raise NotFound(f"no finished request with id {request_id!r}")
        return found

    def window_of(request: Request) -> Window:
        q = request.query_params
        try:
            return parse_window(q.get("window"), q.get("since"), time.time(), summary_window)
        except WindowError as exc:
            raise BadRequest(str(exc)) from None

    async def summary_rows(tenant: str | None, window: Window) -> list[dict[str, Any]]:
        try:
            return await asyncio.to_thread(
                functools.partial(store.summary, 1, tenant=tenant, since_s=window.since_s)
            )
        except StoreError as exc:
            raise StoreUnavailable(str(exc)) from None

    @api.get("/v1/energy/summary")
    async def summary(request: Request) -> dict[str, Any]:
        """Per model x category means over the successful requests of a time window
        (`?window=24h`, `?since=...`, default `--summary-window`), a tenant's own for a
        tenant's key. Read from hourly rollups: the cost does not grow with the records."""
        tenant = tenant_of(caller(request))
        window = window_of(request)
        rows = await summary_rows(tenant, window)
        # Energy Score (metering/ratings/score.py): stars per category from the rows'
        # energy per 1,000 queries; null under the minimum count a rating rests on.
        return {
            "rows": rate(rows),
            "min_count_for_rating": MIN_REQUESTS_FOR_RATING,
            **window.to_dict(),
        }

    @api.get("/v1/energy/label/{model:path}.svg")  # :path: model ids like org/name
    async def label(request: Request, model: str, category: str | None = None) -> Response:
        """The model's Energy Score label for one category (default: its busiest), over
        the same window as the summary."""
        tenant = tenant_of(caller(request))
        window = window_of(request)
        rated = rate(await summary_rows(tenant, window))
        mine = [r for r in rated if r["model"] == model]
        if not mine:
            raise NotFound(
                f"no finished requests for model {model!r} in the request store "
                f"(window {window.name})"
            )
        if category is None:
            row = max(mine, key=lambda r: r["count"])
        else:
            found = [r for r in mine if r["category"] == category]
            if not found:
                raise NotFound(f"no finished {category!r} requests for model {model!r}")
            row = found[0]
        svg = render_label(
            model,
            row["category"],
            row["stars"],
            row["wh_per_1000_queries"],
            hardware,
            time.strftime("%Y-%m-%d", time.gmtime()),
            row["count"],
        )
        return Response(svg, media_type="image/svg+xml")

    return api
