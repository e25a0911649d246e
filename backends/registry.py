"""The configured backends, the models each one lists, and routing by model name.

Model lists come from each backend's `GET /v1/models`, fetched at start-up, refreshed on
a period in the background, and re-fetched (at most every few seconds) when a request
names a model nobody lists, so a model loaded after start-up is found without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from backends.own_metrics import inflight_from_metrics

log = logging.getLogger("energy_proxy.backends")


class JsonGetter(Protocol):
    async def get_json(self, url: str, timeout_s: float) -> object: ...

    async def get_text(self, url: str, timeout_s: float) -> str: ...


@dataclass(slots=True)
class Backend:
    name: str
    url: str
    kind: str = "openai"
    api_key: str | None = None
    gpus: list[int] | None = None
    models: list[dict[str, Any]] = field(default_factory=list)
    ready: bool = False
    listed: bool = False  # the model list has been fetched at least once
    last_error: str = ""
    # The backend's own in-flight count from its /metrics; None where it exports none.
    own_inflight: float | None = None

    @property
    def model_ids(self) -> list[str]:
        return [str(m["id"]) for m in self.models if "id" in m]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "kind": self.kind,
            "ready": self.ready,
            "models": self.model_ids,
            **({"error": self.last_error} if self.last_error else {}),
        }


def base_url(url: str) -> str:
    """Accept `http://host:port` and `http://host:port/v1` alike."""
    url = url.rstrip("/")
    return url.removesuffix("/v1")


class BackendRegistry:
    """Backends by name and a routing table model -> backend, rebuilt on each refresh."""

    MISS_REFRESH_S = 2.0
    LIST_TIMEOUT_S = 5.0

    def __init__(
        self,
        backends: Sequence[Backend],
        getter: JsonGetter,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not backends:
            raise ValueError("at least one backend is needed (--backend URL)")
        self.backends = list(backends)
        for b in self.backends:
            b.url = base_url(b.url)
        self._getter = getter
        self._clock = clock
        self._routes: dict[str, Backend] = {}
        self._last_refresh_s = -1e9
        self._refresh_lock = asyncio.Lock()

    # --- routing (the hot path: one dict lookup) ---------------------------------------

    def lookup(self, model: str) -> Backend | None:
        backend = self._routes.get(model)
        if backend is not None:
            return backend
        if len(self.backends) == 1 and not self.backends[0].listed:
            # A single backend whose list we could not read yet: let it answer for itself.
            return self.backends[0]
        return None

    async def route(self, model: str) -> Backend | None:
        backend = self.lookup(model)
        if backend is None and self._clock() - self._last_refresh_s > self.MISS_REFRESH_S:
            await self.refresh()
            backend = self.lookup(model)
        return backend

    def known_models(self) -> frozenset[str]:
        return frozenset(self._routes)

    # --- discovery -----------------------------------------------------------------------

    async def refresh(self) -> None:
        async with self._refresh_lock:
            self._last_refresh_s = self._clock()
            await asyncio.gather(*(self._refresh_one(b) for b in self.backends))
            routes: dict[str, Backend] = {}
            for b in self.backends:
                for mid in b.model_ids:
                    # First configured backend wins a model two backends both list.
                    routes.setdefault(mid, b)
            self._routes = routes

    async def _refresh_one(self, b: Backend) -> None:
        try:
            doc = await self._getter.get_json(f"{b.url}/v1/models", self.LIST_TIMEOUT_S)
        except Exception as exc:  # any failure: the backend is not ready, the proxy goes on
            if b.ready or not b.last_error:
                log.warning("backend %s (%s) not ready: %s", b.name, b.url, exc)
            b.ready = False
            b.last_error = str(exc) or type(exc).__name__
            return
        data = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(data, list):
            b.ready = False
            b.last_error = "GET /v1/models did not return an OpenAI model list"
            return
        b.models = [m for m in data if isinstance(m, dict) and "id" in m]
        b.ready = True
        b.listed = True
        b.last_error = ""

    async def run(self, period_s: float) -> None:
        """Refresh forever every `period_s` seconds (cancel to stop)."""
        while True:
            await asyncio.sleep(period_s)
            await self.refresh()

    async def scrape_own_metrics(self) -> None:
        """Read each backend's own in-flight count from its `/metrics` (where it has one)."""
        await asyncio.gather(*(self._scrape_one(b) for b in self.backends))

    async def _scrape_one(self, b: Backend) -> None:
        try:
            text = await self._getter.get_text(f"{b.url}/metrics", self.LIST_TIMEOUT_S)
        except Exception:  # no /metrics, or down: there is simply no figure to compare
            b.own_inflight = None
            return
        b.own_inflight = inflight_from_metrics(text)

    async def run_own_metrics(self, period_s: float) -> None:
        """Scrape the backends' own metrics now and every `period_s` seconds (cancel to stop)."""
        while True:
            await self.scrape_own_metrics()
            await asyncio.sleep(period_s)

    def merged_models(self) -> dict[str, Any]:
        """`/v1/models`: every backend's entries, first listing of an id wins."""
        seen: set[str] = set()
        data: list[dict[str, Any]] = []
        for b in self.backends:
            for m in b.models:
                if m["id"] not in seen:
                    seen.add(m["id"])
                    data.append(m)
        return {"object": "list", "data": data}
