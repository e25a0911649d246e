"""The live page at `/` and its server-sent events at `/v1/energy/events`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from proxy.api.access import Access
from proxy.errors import TooManyStreams
from proxy.live.feed import LiveFeed
from proxy.live.page import LivePage
from proxy.live.stream import LiveStreamResponse, live_events


class LiveApi:
    def __init__(self, feed: LiveFeed, access: Access) -> None:
        self.feed = feed
        self.access = access
        self.page = LivePage.load()

    def router(self) -> APIRouter:
        r = APIRouter()
        r.add_api_route("/", self.live_page, methods=["GET"])
        r.add_api_route("/v1/energy/events", self.events, methods=["GET"])
        return r

    async def live_page(self) -> Response:
        """The live page. It holds no data: what it shows comes from the endpoints below,
        with the key the page asks for when the proxy has keys."""
        page = self.page
        return Response(page.html, media_type="text/html; charset=utf-8", headers=page.headers())

    async def events(self, request: Request) -> Response:
        """Server-sent events for the live page and anyone else (README "Live events")."""
        key = self.access.caller(request)
        owner = key.name if key is not None else ""
        problem = self.feed.hub.room_for(owner)
        if problem:
            raise TooManyStreams(problem)
        return LiveStreamResponse(live_events(self.feed, self.access.tenant_of(key), owner))
