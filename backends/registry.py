"""The configured backends, the models each one lists, and the backends serving each model.

Model lists come from each backend's model listing (`GET /v1/models`, or what its kind
offers), fetched at start-up, refreshed on a period in the background, and re-fetched (at
most every few seconds) when a request names a model nobody lists, so a model loaded after
start-up is found without a restart. A backend configured with kind `auto` has its kind
detected on the same refreshes until a probe succeeds; then the kind is kept.
A backend is ready when its kind's health check passes and its model list was read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from backends.adapters import Adapter, ModelListError
from backends.backend import DETECTED, UNDETECTED, Backend
from backends.crosscheck import rebase, untracked_tokens
from backends.detect import detect_kind
from backends.fetch import JsonGetter, JsonPoster, KeyedGetter

__all__ = ["Backend", "BackendRegistry", "JsonGetter", "JsonPoster", "OwnMetricsHook"]

# Told a backend's own running and waiting counts as soon as they are read (the meter's
# queue model of the backend learns its capacity from them): (name, running, waiting).
OwnMetricsHook = Callable[[str, float | None, float | None], None]

log = logging.getLogger("energy_proxy.backends")


class BackendRegistry:
    """Backends by name and a routing table model -> backend, rebuilt on each refresh."""

    MISS_REFRESH_S = 2.0
    DOWN_RECHECK_S = 2.0  # refresh period while a backend is not ready
    LIST_TIMEOUT_S = 5.0
    PROBE_TIMEOUT_S = 2.0  # each detection probe (all run at once)
    TOKENIZE_TIMEOUT_S = 2.0  # the final event of a stream waits on it
    # --pass-backend-metrics: a read shared by scrapes this close, its deadline, its size.
    PASS_METRICS_KEEP_S = 1.0
    PASS_METRICS_TIMEOUT_S = 2.0
    PASS_METRICS_MAX_CHARS = 8_000_000

    def __init__(
        self,
        backends: Sequence[Backend],
        getter: JsonGetter,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_own_metrics: OwnMetricsHook | None = None,
    ) -> None:
        if not backends:
            raise ValueError("at least one backend is needed (--backend URL)")
        self.backends = list(backends)
        self._getter = getter
        # Token counting needs a POST; a getter without one simply counts nothing.
        self._poster = getter if isinstance(getter, JsonPoster) else None
        self._clock = clock
        self._routes: dict[str, tuple[Backend, ...]] = {}
        self._on_own_metrics = on_own_metrics
        self._last_refresh_s = -1e9
        self._refresh_lock = asyncio.Lock()
        self._went_down = asyncio.Event()  # a request found a ready backend unreachable
        self._gauges_wanted = asyncio.Event()  # read the gauges now (wake_gauges)
        # The last read of each backend's own metrics text: (clock, text or None).
        self._metrics_kept: dict[str, tuple[float, str | None]] = {}

    # --- routing (the hot path: one dict lookup) ---------------------------------------

    def lookup(self, model: str) -> tuple[Backend, ...]:
        """The backends that list `model`, in configured order (empty: none does)."""
        found = self._routes.get(model)
        if found is not None:
            return found
        if len(self.backends) == 1 and not self.backends[0].state.listed:
            # A single backend whose list we could not read yet: let it answer for itself.
            return (self.backends[0],)
        return ()

    def default_backend(self) -> Backend:
        """Where a request that names no model goes (an API whose model is optional, a
        passed-through path): the first configured backend."""
        return self.backends[0]

    async def route(self, model: str) -> tuple[Backend, ...]:
        """The backends serving `model`; a model nobody lists makes the lists read again
        (at most every MISS_REFRESH_S), so one loaded after start-up is found."""
        found = self.lookup(model)
        if not found and self._clock() - self._last_refresh_s > self.MISS_REFRESH_S:
            await self.refresh()
            found = self.lookup(model)
        return found

    def inflight(self) -> int:
        """Requests the proxy has in flight to all its backends."""
        return sum(b.traffic.inflight for b in self.backends)

    def known_models(self) -> frozenset[str]:
        return frozenset(self._routes)

    def lists(self, model: str) -> bool:
        """Whether some backend lists `model` (the hot path's label check: no set built)."""
        return model in self._routes

    # --- discovery -----------------------------------------------------------------------

    async def refresh(self) -> None:
        async with self._refresh_lock:
            self._last_refresh_s = self._clock()
            # A serial server busy with a request keeps its list until it is idle: asking
            # it now would cut off the stream it is sending (see Kind.serial).
            idle = [b for b in self.backends if not (b.spec.serial and b.traffic.inflight)]
            await asyncio.gather(*(self._refresh_one(b) for b in idle))
            routes: dict[str, list[Backend]] = {}
            for b in self.backends:
                for mid in dict.fromkeys(b.state.model_ids):
                    # In configured order: the routing policy chooses among them.
                    routes.setdefault(mid, []).append(b)
            self._routes = {mid: tuple(bs) for mid, bs in routes.items()}

    async def _refresh_one(self, b: Backend) -> None:
        if b.state.kind_source == UNDETECTED:
            await self._detect(b)
        adapter = b.adapter
        listing, health_problem = await asyncio.gather(
            self._list(adapter, b),
            adapter.check_health(self._getter_for(b), b.url, self.LIST_TIMEOUT_S),
        )
        if isinstance(listing, list):
            b.state.models = listing
            b.state.listed = True
        problem = listing if isinstance(listing, str) else health_problem
        if problem:
            self._set_down(b, problem)
            return
        self._set_up(b)

    # --- what requests tell (the relay reports; no I/O here) -------------------------------

    def note_unreachable(self, b: Backend, error: str) -> None:
        """A request could not reach `b`, or `b` broke off its answer: it is not ready
        until it answers again (a request, or the next refresh, which comes sooner while
        a backend is down: see `run`)."""
        self._set_down(b, error)

    def note_answered(self, b: Backend) -> None:
        """`b` answered a request: it is up again if a request had marked it down."""
        if b.state.listed and not b.state.ready:
            self._set_up(b)

    def _set_down(self, b: Backend, problem: str) -> None:
        # Logged once per outage: the first failure after it was ready (or the first ever).
        state = b.state
        if state.ready or not state.last_error:
            log.warning("backend %s (%s) not ready: %s", b.name, b.url, problem)
        if state.ready:
            self._went_down.set()  # `run` switches to the faster recheck now
        state.ready = False
        state.last_error = problem

    def _set_up(self, b: Backend) -> None:
        state = b.state
        if state.last_error:
            log.warning("backend %s (%s) is ready again", b.name, b.url)
        state.ready = True
        state.last_error = ""

    async def _list(self, adapter: Adapter, b: Backend) -> list[dict[str, Any]] | str:
        """The model list, or why it could not be read."""
        try:
            return await adapter.list_models(self._getter_for(b), b.url, self.LIST_TIMEOUT_S)
        except ModelListError as exc:
            return str(exc) or "the model list could not be read"

    async def _detect(self, b: Backend) -> None:
        kind = await detect_kind(self._getter_for(b), b.url, self.PROBE_TIMEOUT_S)
        if kind is None:
            return  # down or starting: ask again on the next refresh
        b.state.kind, b.state.kind_source = kind, DETECTED
        log.info("backend %s (%s) is %s", b.name, b.url, kind)

    def _getter_for(self, b: Backend) -> JsonGetter:
        """The getter for `b`'s own endpoints: with its API key, if it has one."""
        key = b.config.api_key
        return KeyedGetter(self._getter, key) if key else self._getter

    async def run(self, period_s: float) -> None:
        """Refresh forever every `period_s` seconds, every `DOWN_RECHECK_S` while a backend
        is not ready, so `/readyz` turns ready soon after it is back (cancel to stop)."""
        while True:
            down = any(not b.state.ready for b in self.backends)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._went_down.wait(), min(period_s, self.DOWN_RECHECK_S) if down else period_s
                )
            self._went_down.clear()
            try:
                await self.refresh()
            except Exception:  # one refresh's worth is lost, never the loop (one task)
                log.exception("refreshing the backends failed; trying again next period")

    async def scrape_own_metrics(self) -> None:
        """Read each backend's own figures from its `/metrics` (kinds that have one). A
        read, or what is done with it, that fails costs that backend this reading only:
        it is logged, its figures read as unknown, and the next period reads again."""
        await asyncio.gather(*(self._scrape_guarded(b) for b in self.backends))

    async def _scrape_guarded(self, b: Backend) -> None:
        try:
            await self._scrape_one(b)
        except Exception:
            log.exception("reading backend %s's own metrics failed; read again next period", b.name)
            b.state.own = None
            b.state.untracked = None

    async def _scrape_one(self, b: Backend) -> None:
        if b.spec.serial and b.traffic.inflight:
            return
        state, tally = b.state, b.traffic.tally
        own = await b.adapter.own_metrics(self._getter_for(b), b.url, self.LIST_TIMEOUT_S)
        state.own = own
        if own is not None and self._on_own_metrics is not None:
            self._on_own_metrics(b.name, own.inflight, own.waiting)
        if own is None or own.prompt_tokens_total is None or own.completion_tokens_total is None:
            state.untracked = None
            return
        p, c = own.prompt_tokens_total, own.completion_tokens_total
        state.token_baseline = rebase(state.token_baseline, p, c, tally)
        state.untracked = untracked_tokens(state.token_baseline, p, c, tally)

    # --- token counting (after a stream that brought no usage; not on the hot path) -----

    async def count_tokens(self, backend: Backend, model: str, text: str) -> int | None:
        """Tokens in `text` by the backend's own tokenizer; None where its kind has no
        tokenize endpoint, the getter cannot POST, or anything fails. Never raises."""
        if self._poster is None:
            return None
        poster = self._getter_for(backend) if backend.config.api_key else self._poster
        assert isinstance(poster, JsonPoster)
        return await backend.adapter.count_tokens(
            poster, backend.url, model, text, self.TOKENIZE_TIMEOUT_S
        )

    def wake_gauges(self, backend: str = "") -> None:
        """A request opened with more in flight than the backend may run at once: read
        the gauges now (within `fast_s` of the last read), not at the end of the period."""
        self._gauges_wanted.set()

    async def run_own_metrics(
        self,
        period_s: float,
        fast_s: float | None = None,
        wanted: Callable[[str], bool] | None = None,
    ) -> None:
        """Scrape the backends' own metrics now and every `period_s` seconds (cancel to
        stop); every `fast_s` while `wanted(backend)` says requests may be waiting at one
        of them (their gauges show the queue, and the capacity with it), and at once when
        `wake_gauges` is called, at most once a `fast_s`."""
        fast_s = period_s if fast_s is None else min(fast_s, period_s)
        last_s = -math.inf
        while True:
            gap_s = fast_s - (self._clock() - last_s)
            if gap_s > 0:
                await asyncio.sleep(gap_s)
            last_s = self._clock()
            self._gauges_wanted.clear()
            await self.scrape_own_metrics()
            busy = wanted is not None and any(wanted(b.name) for b in self.backends)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._gauges_wanted.wait(), fast_s if busy else period_s)

    async def metrics_text(self, b: Backend) -> str | None:
        """`b`'s own Prometheus text as it serves it, for `/metrics` to carry unchanged
        (--pass-backend-metrics): read at most once a PASS_METRICS_KEEP_S (scrapes close
        together share one read), within PASS_METRICS_TIMEOUT_S in all, at most
        PASS_METRICS_MAX_CHARS. None when it cannot be read now (logged once an outage)."""
        now = self._clock()
        kept = self._metrics_kept.get(b.name)
        if kept is not None and now - kept[0] < self.PASS_METRICS_KEEP_S:
            return kept[1]
        try:
            async with asyncio.timeout(self.PASS_METRICS_TIMEOUT_S):
                text: str | None = await self._getter_for(b).get_text(
                    b.url + b.spec.metrics_path, self.PASS_METRICS_TIMEOUT_S
                )
            if text is not None and len(text) > self.PASS_METRICS_MAX_CHARS:
                raise ValueError(f"longer than {self.PASS_METRICS_MAX_CHARS} characters")
        except Exception as exc:  # down, or no /metrics: the proxy's own series still go
            if kept is None or kept[1] is not None:
                log.warning("backend %s's own metrics could not be read: %s", b.name, exc)
            text = None
        self._metrics_kept[b.name] = (now, text)
        return text

    def merged_models(self) -> dict[str, Any]:
        """`/v1/models`: every backend's entries, first listing of an id wins."""
        seen: set[str] = set()
        data: list[dict[str, Any]] = []
        for b in self.backends:
            for m in b.state.models:
                if m["id"] not in seen:
                    seen.add(m["id"])
                    data.append(m)
        return {"object": "list", "data": data}
