"""The metered routes: forward one request, stream its answer back, attach its energy.

A raw ASGI handler rather than a framework route: it sits on the hot path, and it needs
to see the client hang up while it waits on the backend (uvicorn drops writes to a
closed connection silently, so only `receive()` tells). For each request:

1. read the body (bounded by --max-body-bytes), find `model`, pick the backend;
2. open its measurement (`Meter.open`: every source it draws from is read at this instant);
3. send upstream; relay the answer: a stream event by event as it arrives, a JSON body
   whole (it is one document, and its headers must carry the energy);
4. close the measurement (`Meter.close`) and render the energy as headers + body field,
   or as the final SSE event before `data: [DONE]`; then tell the observers.

Step 4 runs in a `finally`, so a client that hangs up, a backend that dies mid-stream
or a timeout still settles the energy drawn so far, and it is counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import orjson

from backends.backend import Backend
from backends.registry import BackendRegistry
from metering.accounting.prompt_text import prompt_text
from metering.accounting.report import EnergyReport, Timings, Tokens
from metering.categories.classifier import PromptClassifier
from metering.meter import Meter
from proxy.asgi import RawHeaders, Receive, Scope, Send, send_error
from proxy.auth import ApiKey, KeyRing
from proxy.errors import (
    BackendUnreachable,
    BadRequest,
    ClientTooSlow,
    HeadersTooLarge,
    ProxyError,
    Unauthorized,
    UnknownModel,
    UpstreamError,
    error_body,
)
from proxy.headers import (
    client_request_id,
    downstream_response_headers,
    header_limit_problem,
    header_value,
    upstream_request_headers,
)
from proxy.observe.finished import Observers, RequestFinished
from proxy.relay.exchange import (
    CLIENT_CLOSED,
    Exchange,
    RequestIds,
    ask_for_usage,
    backend_auth,
    parse_payload,
    read_body,
    timings_from_answer,
    tokens_from_usage,
    watch_disconnect,
)
from proxy.relay.sse import SseSplitter, StreamInspector, done_event, energy_event
from proxy.relay.upstream import UpstreamClient, UpstreamResponse

log = logging.getLogger("energy_proxy.requests")

METERED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
STREAMABLE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
MAX_MODEL_CHARS = 256
MAX_CATEGORY_CHARS = 64


@dataclass(slots=True)
class RelayContext:
    """What the hot path needs; built by `create_app`, never global."""

    registry: BackendRegistry
    upstream: UpstreamClient
    meter: Meter
    observers: Observers
    keys: KeyRing
    max_body_bytes: int
    # decides a request's category when the client sent no x-prompt-category
    classifier: PromptClassifier = field(default_factory=PromptClassifier)
    ids: RequestIds = field(default_factory=RequestIds)
    # Seconds a client may take to send its body, or leave an answer unread.
    client_timeout_s: float = 60.0
    # Requests in flight, for the watchdog of clients that stop reading.
    exchanges: set[Exchange] = field(default_factory=set)


class MeteredRoute:
    def __init__(self, ctx: RelayContext) -> None:
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: RawHeaders = scope["headers"]
        ctx = self.ctx
        # The store's key is always an id the proxy made; the client's own x-request-id,
        # when usable, is kept beside it, forwarded and echoed.
        request_id = ctx.ids.new()
        client_id, rejected = client_request_id(header_value(headers, b"x-request-id"))
        id_headers = [
            (b"x-request-id", (client_id or request_id).encode("latin-1")),
            (b"x-energy-request-id", request_id.encode("latin-1")),
        ]
        if rejected:
            id_headers.append((b"x-request-id-rejected", rejected.encode("latin-1")))
        try:
            if scope["method"] != "POST":
                raise BadRequest(f"{scope['path']} takes POST", code="method_not_allowed")
            limit_problem = header_limit_problem(headers)
            if limit_problem:
                raise HeadersTooLarge(limit_problem)
            key = self._check_key(headers)
            try:
                async with asyncio.timeout(ctx.client_timeout_s):
                    body = await read_body(receive, ctx.max_body_bytes)
            except TimeoutError:
                raise ClientTooSlow(
                    f"the request body did not arrive within {ctx.client_timeout_s:g} s"
                ) from None
            if body is None:
                return  # the client left before sending its request
            payload = parse_payload(body)
            model = payload["model"]
            if len(model) > MAX_MODEL_CHARS:
                raise BadRequest(
                    f"'model' is longer than {MAX_MODEL_CHARS} characters", code="invalid_model"
                )
            category = self._category(headers) or ctx.classifier.classify_payload(payload)
            backend = await ctx.registry.route(model)
            if backend is None:
                known = ", ".join(sorted(ctx.registry.known_models())) or "none listed yet"
                raise UnknownModel(f"model {model!r} is not served here (models: {known})")
        except ProxyError as exc:
            ctx.observers.rejected(exc.status)
            await send_error(send, exc, id_headers)
            return

        stream = scope["path"] in STREAMABLE_PATHS and payload.get("stream") is True
        client_wants_usage = False
        if stream:
            body, client_wants_usage = ask_for_usage(payload, body)
        measurement = ctx.meter.open(
            backend.name,
            payload,
            stream=stream,
            embeddings=scope["path"] == "/v1/embeddings",
            serial=backend.spec.serial,
        )
        ex = Exchange(request_id, model, category, backend, measurement, payload)
        ex.client_id = client_id
        ex.tenant = key.name if key is not None else ""
        traffic = backend.traffic
        traffic.inflight += 1
        task = asyncio.current_task()
        assert task is not None
        ex.task = task
        ctx.exchanges.add(ex)
        watcher = asyncio.ensure_future(watch_disconnect(receive, task, ex))
        resp: UpstreamResponse | None = None
        ex.cancellable = True
        try:
            forwarded_id = (client_id or request_id).encode("latin-1")
            up_headers = upstream_request_headers(
                headers,
                # The client's key is for the proxy: never passed on unless configured.
                drop_authorization=not backend.config.forward_authorization,
                # The client's own x-request-id header is not passed on as it came (any
                # length, any bytes): the id the proxy echoes goes instead.
                drop_request_id=True,
                extra=[
                    *backend_auth(backend),
                    *(
                        [(b"x-request-id", forwarded_id)]
                        if backend.spec.forwards_request_id
                        else []
                    ),
                ],
            )
            try:
                resp = await ctx.upstream.send(
                    "POST", backend.url + scope["path"], up_headers, body
                )
            except UpstreamError as exc:
                ex.status = exc.status
                ex.started = ex.response_done = True
                self._note_failure(backend, exc)
                await send_error(send, exc, id_headers)
                return
            if not backend.state.ready:
                ctx.registry.note_answered(backend)
            ex.status = resp.status
            ctype = header_value(resp.headers, b"content-type") or b""
            if resp.status != 200:
                await self._relay_raw(resp, send, id_headers, ex)
            elif stream and ctype.startswith(b"text/event-stream"):
                await self._relay_stream(resp, send, id_headers, ex, client_wants_usage)
            elif ctype.startswith(b"application/json"):
                await self._relay_json(resp, send, id_headers, ex)
            else:
                await self._relay_raw(resp, send, id_headers, ex)
        except asyncio.CancelledError:
            if not ex.client_gone:
                raise
            task.uncancel()  # our own watcher cancelled us: the client hung up
        except UpstreamError as exc:
            # Mid-response: headers are out, so the status cannot change any more.
            ex.status = exc.status
            self._note_failure(backend, exc)
            log.warning("request %s: backend failed mid-response: %s", request_id, exc.message)
        finally:
            ex.cancellable = False
            ctx.exchanges.discard(ex)
            watcher.cancel()
            if ex.client_gone:
                ex.status = CLIENT_CLOSED
            partial = ex.inspector
            report = self._settle(
                ex, tokens_from_usage(partial.usage, partial.counted_tokens) if partial else None
            )
            traffic.inflight -= 1
            if resp is not None:
                await resp.close()
            if ex.client_gone and partial is not None and report.tokens.prompt is None:
                await self._tally_cut_prompt(ex)

    # --- answers -------------------------------------------------------------------------

    async def _relay_json(
        self, resp: UpstreamResponse, send: Send, id_headers: RawHeaders, ex: Exchange
    ) -> None:
        data = await resp.read()
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            doc = None
        usage = doc.get("usage") if isinstance(doc, dict) else None
        report = self._settle(ex, tokens_from_usage(usage, None), timings_from_answer(doc))
        if isinstance(doc, dict) and doc and data.rstrip().endswith(b"}"):
            # Splice the energy object in without re-encoding the backend's document.
            data = data.rstrip()[:-1] + b',"energy":' + orjson.dumps(ex.energy) + b"}"
        out = downstream_response_headers(resp.headers)
        out.extend(id_headers)
        out.extend(report.headers())
        out.append((b"content-length", str(len(data)).encode()))
        ex.started = True
        await send({"type": "http.response.start", "status": resp.status, "headers": out})
        ex.response_done = True
        ex.sending_since = time.monotonic()  # the watchdog times a stuck send
        await send({"type": "http.response.body", "body": data, "more_body": False})
        ex.sending_since = 0.0

    async def _relay_stream(
        self,
        resp: UpstreamResponse,
        send: Send,
        id_headers: RawHeaders,
        ex: Exchange,
        client_wants_usage: bool,
    ) -> None:
        out = downstream_response_headers(resp.headers)
        out.extend(id_headers)
        out.append((b"x-prompt-category", ex.category.encode()))
        ex.started = True
        await send({"type": "http.response.start", "status": resp.status, "headers": out})
        splitter = SseSplitter()
        inspector = ex.inspector = StreamInspector(client_wants_usage)
        failure: UpstreamError | None = None
        process, feed = inspector.process, splitter.feed
        meter, measurement = self.ctx.meter, ex.measurement
        try:
            while chunk := await resp.next_chunk():
                events = feed(chunk)
                if len(events) == 1:  # the usual: one whole event per chunk
                    body = process(events[0])
                else:
                    body = b"".join([e for e in map(process, events) if e is not None])
                if not measurement.decoding and inspector.counted_tokens:
                    meter.first_token(measurement)
                if body:
                    ex.sending_since = time.monotonic()  # the watchdog times a stuck send
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    ex.sending_since = 0.0
        except UpstreamError as exc:
            failure = exc
        tail = splitter.rest()
        if tail.strip():
            kept = inspector.process(tail + splitter.separator)
            if kept is not None:
                ex.sending_since = time.monotonic()  # the watchdog times a stuck send
                await send({"type": "http.response.body", "body": kept, "more_body": True})
                ex.sending_since = 0.0
        tokens = tokens_from_usage(inspector.usage, inspector.counted_tokens)
        if tokens.prompt is None and failure is None:
            tokens = Tokens(await self._count_prompt(ex), tokens.completion, tokens.source)
        self._settle(ex, tokens, timings_from_answer(inspector.usage_chunk))
        sep = splitter.separator
        final = b""
        if failure is not None:
            ex.status = failure.status
            self._note_failure(ex.backend, failure)
            final += b"data: " + error_body(failure.message, failure.type, failure.code) + sep
        final += energy_event(inspector.template, ex.energy, sep)
        if inspector.done:
            final += done_event(sep)
        ex.response_done = True
        ex.sending_since = time.monotonic()  # the watchdog times a stuck send
        await send({"type": "http.response.body", "body": final, "more_body": False})
        ex.sending_since = 0.0

    async def _relay_raw(
        self, resp: UpstreamResponse, send: Send, id_headers: RawHeaders, ex: Exchange
    ) -> None:
        """Status, headers and body exactly as the backend sent them (plus x-request-id)."""
        out = downstream_response_headers(resp.headers)
        out.extend(id_headers)
        ex.started = True
        await send({"type": "http.response.start", "status": resp.status, "headers": out})
        async for chunk in resp.chunks():
            ex.sending_since = time.monotonic()  # the watchdog times a stuck send
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            ex.sending_since = 0.0
        ex.response_done = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    # --- accounting ------------------------------------------------------------------------

    def _settle(
        self, ex: Exchange, tokens: Tokens | None, timings: Timings | None = None
    ) -> EnergyReport:
        """Close the request's measurement once and tell the observers; later calls
        return the same report. `timings`: what the backend said of its phases."""
        if ex.report is not None:
            return ex.report
        ctx = self.ctx
        report = ctx.meter.close(
            ex.measurement,
            answered=200 <= ex.status < 300 and not ex.client_gone,
            request_id=ex.request_id,
            model=ex.model,
            category=ex.category,
            tokens=tokens,
            client_request_id=ex.client_id,
            timings=timings,
        )
        ex.report = report
        ex.energy = report.to_dict()
        ctx.observers.finished(
            RequestFinished(
                report=report,
                energy=ex.energy,
                backend=ex.backend,
                status=ex.status or 200,
                finished_at=time.time(),
                tenant=ex.tenant,
                model_label=ex.model if ctx.registry.lists(ex.model) else "other",
            )
        )
        return report

    async def watch_slow_clients(self) -> None:
        """Forever (cancel to stop): a client that leaves an answer unread for longer than
        the client timeout is treated as gone, so it holds no backend slot forever."""
        ctx = self.ctx
        period_s = max(0.05, min(1.0, ctx.client_timeout_s / 4))
        while True:
            await asyncio.sleep(period_s)
            now = time.monotonic()
            for ex in list(ctx.exchanges):
                since = ex.sending_since
                if since and now - since > ctx.client_timeout_s and ex.cancellable:
                    log.warning(
                        "a client left its answer unread for %.0f s: closing it", now - since
                    )
                    ex.client_gone = True
                    if ex.task is not None:
                        ex.task.cancel()

    def _note_failure(self, backend: Backend, exc: UpstreamError) -> None:
        """A backend that refuses connections or breaks off answers is not ready (a
        timeout is not: a long generation may just be slow)."""
        if isinstance(exc, BackendUnreachable):
            self.ctx.registry.note_unreachable(backend, exc.message)

    # --- checks --------------------------------------------------------------------------

    async def _count_prompt(self, ex: Exchange, others_inflight: int = 1) -> int | None:
        """The prompt's tokens by the backend's own tokenizer, for a stream that brought
        no usage; None where it has none, or a serial server has other work in flight
        (asking it then would cut off another client's stream). `others_inflight`: the
        backend's in-flight count that is this request's own (1 while it runs)."""
        b = ex.backend
        if b.spec.tokenizer is None or (b.spec.serial and b.traffic.inflight > others_inflight):
            return None
        return await self.ctx.registry.count_tokens(b, ex.model, prompt_text(ex.payload))

    async def _tally_cut_prompt(self, ex: Exchange) -> None:
        """A stream the client cut off brought no usage, yet the backend read its prompt:
        counted now (the upstream is closed, the energy settled), into the backend's tally
        only, so the cross-check does not call a hang-up's prompt work that went around
        the proxy."""
        n = await self._count_prompt(ex, others_inflight=0)
        if n:
            ex.backend.traffic.tally.prompt += n

    def _check_key(self, headers: RawHeaders) -> ApiKey | None:
        """The caller's key (None when the proxy has no keys); 401 without a valid one."""
        keys = self.ctx.keys
        if not keys.enabled:
            return None
        key = keys.identify(header_value(headers, b"authorization"))
        if key is None:
            raise Unauthorized("missing or invalid API key for this proxy")
        return key

    def _category(self, headers: RawHeaders) -> str | None:
        """The client's own `x-prompt-category` (400 if outside the set), else None."""
        raw = header_value(headers, b"x-prompt-category")
        if raw is None:
            return None
        if len(raw) > MAX_CATEGORY_CHARS:
            raise BadRequest(
                f"x-prompt-category is longer than {MAX_CATEGORY_CHARS} characters",
                code="invalid_category",
            )
        value = raw.decode("latin-1").strip().lower()
        categories = self.ctx.classifier.categories
        if value not in categories:
            allowed = ", ".join(sorted(categories))
            raise BadRequest(
                f"x-prompt-category {value!r} is not one of: {allowed}", code="invalid_category"
            )
        return value
