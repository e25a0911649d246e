"""The energy of finished requests: one record, the summary per model and category with
its Energy Score stars, and each model's label."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from metering.ratings.label import render_label
from metering.ratings.score import MIN_REQUESTS_FOR_RATING, rate
from metering.store import RequestStore, StoreError
from metering.store.window import DEFAULT_WINDOW, Window, WindowError, parse_window
from proxy.api.access import Access
from proxy.budgets import BudgetBook
from proxy.errors import BadRequest, NotFound, StoreUnavailable

MAX_REQUEST_ID_CHARS = 256


class EnergyApi:
    def __init__(
        self,
        store: RequestStore,
        access: Access,
        *,
        hardware: str = "",
        summary_window: str = DEFAULT_WINDOW,
        budgets: BudgetBook | None = None,
    ) -> None:
        self.store = store
        self.access = access
        self.budgets = budgets
        self.hardware = hardware  # what the energy is measured on, for the labels
        self.summary_window = summary_window

    def router(self) -> APIRouter:
        r = APIRouter()
        r.add_api_route("/v1/energy/requests/{request_id}", self.record, methods=["GET"])
        r.add_api_route("/v1/energy/summary", self.summary, methods=["GET"])
        r.add_api_route("/v1/energy/budgets", self.budget_use, methods=["GET"])
        # :path, for model ids like org/name
        r.add_api_route("/v1/energy/label/{model:path}.svg", self.label, methods=["GET"])
        return r

    async def record(self, request: Request, request_id: str) -> dict[str, Any]:
        tenant = self.access.tenant_of(self.access.caller(request))
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise NotFound("no finished request with such a long id")
        try:
            found = await asyncio.to_thread(self.store.get, request_id, tenant)
        except StoreError as exc:
            raise StoreUnavailable(str(exc)) from None
        if found is None:
            raise NotFound(f"no finished request with id {request_id!r}")
        return found

    async def budget_use(self, request: Request) -> dict[str, Any]:
        """Each budget's use in its current period: the caller's own (every key's for an
        admin). An empty list where no key has a budget."""
        tenant = self.access.tenant_of(self.access.caller(request))
        return {"budgets": [] if self.budgets is None else self.budgets.report(tenant)}

    async def summary(self, request: Request) -> dict[str, Any]:
        """Per model x category means over the successful requests of a time window
        (`?window=24h`, `?since=...`, default `--summary-window`), a tenant's own for a
        tenant's key. Read from hourly rollups: the cost does not grow with the records."""
        tenant = self.access.tenant_of(self.access.caller(request))
        window = self._window(request)
        rows = await self._rows(tenant, window)
        # Energy Score (metering/ratings/score.py): stars per category from the rows'
        # energy per 1,000 queries; null under the minimum count a rating rests on.
        return {
            "rows": rate(rows),
            "min_count_for_rating": MIN_REQUESTS_FOR_RATING,
            **window.to_dict(),
        }

    async def label(self, request: Request, model: str, category: str | None = None) -> Response:
        """The model's Energy Score label for one category (default: its busiest), over
        the same window as the summary."""
        tenant = self.access.tenant_of(self.access.caller(request))
        window = self._window(request)
        rated = rate(await self._rows(tenant, window))
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
            self.hardware,
            time.strftime("%Y-%m-%d", time.gmtime()),
            row["count"],
        )
        return Response(svg, media_type="image/svg+xml")

    def _window(self, request: Request) -> Window:
        q = request.query_params
        try:
            return parse_window(q.get("window"), q.get("since"), time.time(), self.summary_window)
        except WindowError as exc:
            raise BadRequest(str(exc)) from None

    async def _rows(self, tenant: str | None, window: Window) -> list[dict[str, Any]]:
        try:
            return await asyncio.to_thread(
                functools.partial(self.store.summary, 1, tenant=tenant, since_s=window.since_s)
            )
        except StoreError as exc:
            raise StoreUnavailable(str(exc)) from None
