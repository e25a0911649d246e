"""`/v1/models`: the merged list of every backend's models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from backends.registry import BackendRegistry
from proxy.api.access import Access


class ModelsApi:
    def __init__(self, backends: BackendRegistry, access: Access) -> None:
        self.backends = backends
        self.access = access

    def router(self) -> APIRouter:
        r = APIRouter()
        r.add_api_route("/v1/models", self.models, methods=["GET"])
        return r

    async def models(self, request: Request) -> dict[str, Any]:
        self.access.caller(request)
        return self.backends.merged_models()
