"""Paths of the backend's API the proxy does not meter, passed through untouched.

Method, path, query string, headers and body go to the backend as they came (the
client's proxy key excepted, as on metered paths); its status, headers and body come
back as it sends them, streamed. Which paths pass is a list of patterns
(`--passthrough`): by default the backend's OpenAI-style APIs and its harmless
utilities, not its admin endpoints (`/invocations`, LoRA loading, sleep, profiling,
cache resets), which a deployment opens by naming them.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson

from backends.backend import Backend
from proxy.asgi import RawHeaders, Receive, Scope, Send, send_error
from proxy.budgets import OverBudget, refuse_over_budget
from proxy.errors import HeadersTooLarge, NotFound, ProxyError
from proxy.headers import (
    downstream_response_headers,
    header_limit_problem,
    header_value,
    upstream_request_headers,
)
from proxy.relay.endpoints import METERED
from proxy.relay.exchange import backend_auth, id_headers_for, read_body_within
from proxy.relay.path_rules import PathRules
from proxy.relay.route import RelayContext
from proxy.relay.routing import backends_for_model, check_key, first_ready, upstream_url

log = logging.getLogger("energy_proxy.requests")


class Passthrough:
    """The relay for unmetered paths (and OPTIONS on metered ones)."""

    def __init__(self, ctx: RelayContext, rules: PathRules) -> None:
        self.ctx = ctx
        self.rules = rules

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = self.ctx
        _, _, id_headers = id_headers_for(ctx.ids, scope["headers"])
        try:
            backend, body = await self._intake(scope, receive)
        except OverBudget as over:
            await refuse_over_budget(send, over.verdict, id_headers, time.time())
            return
        except ProxyError as exc:
            await send_error(send, exc, id_headers)
            return
        if body is None:
            return  # the client left
        up_headers = upstream_request_headers(
            scope["headers"],
            drop_authorization=not backend.config.forward_authorization,
            extra=backend_auth(backend),
        )
        try:
            resp = await ctx.upstream.send(
                scope["method"], upstream_url(backend, scope), up_headers, body
            )
        except ProxyError as exc:
            await send_error(send, exc, id_headers)
            return
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            out = downstream_response_headers(resp.headers)
            out.extend(id_headers)
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            while not gone.done() and (chunk := await resp.next_chunk()):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except ProxyError as exc:  # mid-answer: the headers are out; cut it off
            log.warning("%s %s: the backend broke off: %s", scope["method"], scope["path"],
                        exc.message)  # fmt: skip
        finally:
            gone.cancel()
            await resp.close()

    async def _intake(self, scope: Scope, receive: Receive) -> tuple[Backend, bytes | None]:
        ctx = self.ctx
        headers: RawHeaders = scope["headers"]
        problem = header_limit_problem(headers)
        if problem:
            raise HeadersTooLarge(problem)
        path, method = scope["path"], scope["method"]
        if path not in METERED and not self.rules.allows(path):
            raise NotFound(
                f"{path} is not served here (the backend's admin paths pass only when "
                "configured: --passthrough PATTERN)"
            )
        if method != "OPTIONS":  # a browser's preflight carries no credentials
            key = check_key(ctx.keys, headers)  # keys apply as on metered paths
            if ctx.budgets is not None and key is not None:
                # A spent budget holds here too: the backend's other paths use it as well.
                verdict = ctx.budgets.check(key.name)
                if verdict is not None and verdict.exceeded and not verdict.budget.soft:
                    raise OverBudget(verdict)
        body = await read_body_within(receive, ctx.max_body_bytes, ctx.client_timeout_s)
        return await self._backend_for(path, headers, body), body

    async def _backend_for(self, path: str, headers: RawHeaders, body: bytes | None) -> Backend:
        """By the model a JSON body names, or the model in `/v1/models/{id}`; else the
        default backend."""
        registry = self.ctx.registry
        model = _model_in(path, headers, body)
        if model is None:
            return registry.default_backend()
        return first_ready(await backends_for_model(registry, model))


def _model_in(path: str, headers: RawHeaders, body: bytes | None) -> str | None:
    if path.startswith("/v1/models/"):
        return path.removeprefix("/v1/models/") or None
    ctype = header_value(headers, b"content-type") or b""
    if not body or not ctype.startswith(b"application/json"):
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None  # the backend says what is wrong with it
    model = doc.get("model") if isinstance(doc, dict) else None
    return model if isinstance(model, str) and model else None


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
