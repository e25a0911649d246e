"""The metered routes: forward one request, stream its answer back, attach its energy.

A raw ASGI handler rather than a framework route: it sits on the hot path, and it needs
to see the client hang up while it waits on the backend (uvicorn drops writes to a
closed connection silently, so only `receive()` tells). For each request:

1. read the body (bounded by --max-body-bytes), find `model`, pick the backend;
2. open the request in the ledger (reading every power source at this instant);
3. send upstream; relay the answer: a stream event by event as it arrives, a JSON body
   whole (it is one document, and its headers must carry the energy);
4. close the request in the ledger (reading every source again) and render the energy
   as headers + body field, or as the final SSE event before `data: [DONE]`.

Step 4 runs in a `finally`, so a client that hangs up, a backend that dies mid-stream
or a timeout still settles the energy drawn so far, and it is counted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from backends.registry import Backend, BackendRegistry
from metering.accounting.attribution import DECODE, Attribution, EngineQueue, Flight
from metering.accounting.ledger import Ticket
from metering.accounting.prompt_text import prompt_text, prompt_tokens_estimate
from metering.accounting.report import EnergyReport, Tokens, build_report
from metering.accounting.sampler import Sampler
from metering.carbon.intensity import IntensityProvider
from metering.carbon.sci import (
    DEFAULT_EMBODIED_KGCO2EQ,
    DEFAULT_LIFESPAN_YEARS,
    Embodied,
    embodied_g,
)
from metering.categories.classifier import PromptClassifier
from metering.store import RequestRecord, RequestStore
from proxy.auth import ApiKey, KeyRing
from proxy.errors import (
    BackendUnreachable,
    BadRequest,
    BodyTooLarge,
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
from proxy.live.feed import LiveFeed, request_event
from proxy.observe.metrics import ProxyMetrics
from proxy.observe.request_log import RequestLog
from proxy.relay.sse import SseSplitter, StreamInspector, done_event, energy_event
from proxy.relay.upstream import UpstreamClient, UpstreamResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("energy_proxy.requests")

METERED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
STREAMABLE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
CLIENT_CLOSED = 499  # nginx's convention for "the client closed the connection"
MAX_MODEL_CHARS = 256
MAX_CATEGORY_CHARS = 64

_JSON_HEADERS = [(b"content-type", b"application/json")]


class RequestIds:
    """Request ids, "req-" + 24 random hex digits: unguessable (96 bits from os.urandom),
    taken from a pool filled `batch` ids at a time, so a request costs no system call."""

    ID_BYTES = 12

    def __init__(self, batch: int = 512) -> None:
        self._batch = batch
        self._pool = b""
        self._at = 0

    def new(self) -> str:
        if self._at >= len(self._pool):
            self._pool, self._at = os.urandom(self.ID_BYTES * self._batch), 0
        at = self._at
        self._at = at + self.ID_BYTES
        return "req-" + self._pool[at : at + self.ID_BYTES].hex()


@dataclass(slots=True)
class RelayContext:
    """What the metered routes need; built by `create_app`, never global."""

    registry: BackendRegistry
    upstream: UpstreamClient
    sampler: Sampler
    intensity: IntensityProvider
    metrics: ProxyMetrics
    categories: frozenset[str]
    max_body_bytes: int
    keys: KeyRing
    pue: float
    # source names each backend's requests draw from (device groups); all if absent
    channels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # the fraction of the host's GPUs each backend runs on (SCI's RR/ToR)
    resource_share: dict[str, float] = field(default_factory=dict)
    embodied: Embodied = field(
        default_factory=lambda: Embodied.from_kg_years(
            DEFAULT_EMBODIED_KGCO2EQ, DEFAULT_LIFESPAN_YEARS
        )
    )
    attribution: Attribution = field(default_factory=Attribution)
    # The queue model of each backend (by name), for `--attribution queue`.
    queues: dict[str, EngineQueue] = field(default_factory=dict)
    # decides a request's category when the client sent no x-prompt-category
    classifier: PromptClassifier = field(default_factory=PromptClassifier)
    request_log: RequestLog | None = None
    store: RequestStore | None = None
    # The live page's feed (proxy/live/feed.py): told of every finished request.
    live: LiveFeed | None = None
    ids: RequestIds = field(default_factory=RequestIds)
    # Seconds a client may take to send its body, or leave an answer unread.
    client_timeout_s: float = 60.0
    # Requests in flight, for the watchdog of clients that stop reading.
    exchanges: set[_Exchange] = field(default_factory=set)


class _Exchange:
    """State of one request while it is in flight."""

    __slots__ = (
        "backend",
        "cancellable",
        "category",
        "channels",
        "client_gone",
        "client_id",
        "energy",
        "flight",
        "inspector",
        "model",
        "payload",
        "queue",
        "report",
        "response_done",
        "sending_since",
        "started",
        "status",
        "t0",
        "task",
        "tenant",
        "ticket",
    )

    def __init__(
        self,
        model: str,
        category: str,
        backend: Backend,
        channels: tuple[str, ...],
        flight: Flight,
        queue: EngineQueue,
        ticket: Ticket,
        t0: float,
    ) -> None:
        self.channels = channels
        self.client_id: str | None = None
        self.tenant = ""
        self.sending_since = 0.0  # clock time a send to the client began; 0: none pending
        self.task: asyncio.Task[Any] | None = None
        self.flight = flight
        self.queue = queue
        self.model = model
        self.category = category
        self.backend = backend
        self.ticket = ticket
        self.t0 = t0
        self.client_gone = False
        self.cancellable = False  # the watcher may cancel the task only inside the try body
        self.inspector: StreamInspector | None = None
        self.response_done = False
        self.started = False  # response headers sent
        self.status = 0
        self.report: EnergyReport | None = None
        self.energy: dict[str, Any] = {}
        self.payload: dict[str, Any] = {}


class MeteredRoute:
    def __init__(self, ctx: RelayContext) -> None:
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
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
                    body = await _read_body(receive, ctx.max_body_bytes)
            except TimeoutError:
                raise ClientTooSlow(
                    f"the request body did not arrive within {ctx.client_timeout_s:g} s"
                ) from None
            if body is None:
                return  # the client left before sending its request
            payload = _parse_payload(body)
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
            ctx.metrics.count_rejected("other", "other", "none", exc.status)
            await _send_error(send, exc, id_headers)
            return

        stream = scope["path"] in STREAMABLE_PATHS and payload.get("stream") is True
        client_wants_usage = False
        if stream:
            body, client_wants_usage = _ask_for_usage(payload, body)

        channels = ctx.channels.get(backend.name) or tuple(ctx.sampler.by_name)
        embeddings = scope["path"] == "/v1/embeddings"
        queue = ctx.queues.get(backend.name)
        if queue is None:
            queue = ctx.queues[backend.name] = EngineQueue()
        if queue.capacity is None and backend.spec.serial:
            # One request at a time (llama-cpp-python): a known capacity, no metrics needed.
            queue.configured = queue.capacity = 1
        # The prompt's size matters only where a request's prefill can be seen.
        prompt_est = prompt_tokens_estimate(payload) if stream or embeddings else 1.0
        flight = Flight(prompt_est, stream=stream, embeddings=embeddings)
        ticket, t0 = ctx.sampler.start(ctx.attribution.start(flight, queue), channels)
        flight.handle = ticket
        ex = _Exchange(model, category, backend, channels, flight, queue, ticket, t0)
        ex.payload = payload
        ex.client_id = client_id
        ex.tenant = key.name if key is not None else ""
        backend.inflight += 1
        task = asyncio.current_task()
        assert task is not None
        ex.task = task
        ctx.exchanges.add(ex)
        watcher = asyncio.ensure_future(_watch_disconnect(receive, task, ex))
        resp: UpstreamResponse | None = None
        ex.cancellable = True
        try:
            up_headers = upstream_request_headers(
                headers,
                # The client's key is for the proxy: never passed on unless configured.
                drop_authorization=not backend.forward_authorization,
                # The client's own x-request-id header is not passed on as it came (any
                # length, any bytes): the id the proxy echoes goes instead.
                drop_request_id=True,
                extra=[
                    *_backend_auth(backend),
                    *(
                        [(b"x-request-id", (client_id or request_id).encode("latin-1"))]
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
                self._note_failure(backend, exc)
                await _send_error(send, exc, id_headers, ex)
                return
            if not backend.ready:
                ctx.registry.note_answered(backend)
            ex.status = resp.status
            ctype = header_value(resp.headers, b"content-type") or b""
            if resp.status != 200:
                await self._relay_raw(resp, send, id_headers, ex)
            elif stream and ctype.startswith(b"text/event-stream"):
                await self._relay_stream(resp, send, id_headers, ex, request_id, client_wants_usage)
            elif ctype.startswith(b"application/json"):
                await self._relay_json(resp, send, id_headers, ex, request_id)
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
            self._settle(
                ex,
                request_id,
                _tokens_from_usage(partial.usage, partial.counted_tokens) if partial else None,
            )
            backend.inflight -= 1
            if resp is not None:
                await resp.close()

    # --- answers -------------------------------------------------------------------------

    async def _relay_json(
        self,
        resp: UpstreamResponse,
        send: Send,
        id_headers: list[tuple[bytes, bytes]],
        ex: _Exchange,
        request_id: str,
    ) -> None:
        data = await resp.read()
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            doc = None
        usage = doc.get("usage") if isinstance(doc, dict) else None
        report = self._settle(ex, request_id, _tokens_from_usage(usage, None))
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
        id_headers: list[tuple[bytes, bytes]],
        ex: _Exchange,
        request_id: str,
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
        flight = ex.flight
        try:
            while chunk := await resp.next_chunk():
                events = feed(chunk)
                if len(events) == 1:  # the usual: one whole event per chunk
                    body = process(events[0])
                else:
                    body = b"".join([e for e in map(process, events) if e is not None])
                if flight.phase != DECODE and inspector.counted_tokens:
                    # First token out: prefill is over (and it was admitted), it decodes.
                    weight = self.ctx.attribution.first_token(flight, ex.queue)
                    if weight is not None:
                        self.ctx.sampler.reweigh(ex.ticket, weight)
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
        tokens = _tokens_from_usage(inspector.usage, inspector.counted_tokens)
        if tokens.prompt is None and failure is None:
            tokens = Tokens(await self._count_prompt(ex), tokens.completion, tokens.source)
        self._settle(ex, request_id, tokens)
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
        self,
        resp: UpstreamResponse,
        send: Send,
        id_headers: list[tuple[bytes, bytes]],
        ex: _Exchange,
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

    def _settle(self, ex: _Exchange, request_id: str, tokens: Tokens | None) -> EnergyReport:
        """Close the request in the ledger once; later calls return the same report."""
        if ex.report is not None:
            return ex.report
        ctx = self.ctx
        # Answered while the queue model held it waiting: served out of arrival order, in
        # the place of a request the model admitted (which has not started, then).
        answered = 200 <= ex.status < 300 and not ex.client_gone
        instead = ctx.attribution.ran_instead(ex.flight, ex.queue) if answered else None
        shares, t1 = ctx.sampler.finish(ex.ticket, instead.handle if instead else None)
        sampler = ctx.sampler
        # Its place in the backend's queue model goes to the oldest waiting request.
        for admitted, weight in ctx.attribution.finish(ex.flight, ex.queue):
            sampler.reweigh(admitted.handle, weight)
        # Shares of a time channel are the request's share of busy seconds (metering/carbon/sci.py).
        busy_s = sum(s.energy_j for s in shares if s.name.startswith("time:"))
        embodied = embodied_g(
            ctx.embodied, busy_s, ctx.resource_share.get(ex.backend.name, 1.0), 1.0
        )
        domains = sampler.domains
        report = build_report(
            request_id=request_id,
            model=ex.model,
            category=ex.category,
            duration_s=t1 - ex.t0,
            tokens=tokens or Tokens(None, 0, "proxy"),
            shares=shares,
            domains=domains,
            methods=sampler.methods_for([c for c in ex.channels if c in sampler.domains]),
            intensity=ctx.intensity.current(),
            pue=ctx.pue,
            embodied_g=embodied,
            attribution=ctx.attribution.mode,
            client_request_id=ex.client_id,
        )
        ex.report = report
        ex.energy = report.to_dict()
        status = ex.status or 200
        model_label = ex.model if ctx.registry.lists(ex.model) else "other"
        ctx.metrics.observe(report, ex.backend.name, status, model_label)
        if ex.tenant:
            ctx.metrics.observe_tenant(ex.tenant, report, status)
        tally = ex.backend.tally
        tally.prompt += report.tokens.prompt or 0
        tally.completion += report.tokens.completion
        finished_at = time.time()
        if ctx.store is not None:
            ctx.store.add(
                RequestRecord.from_report(
                    report,
                    backend=ex.backend.name,
                    status=status,
                    finished_at=finished_at,
                    tenant=ex.tenant,
                    model_group=model_label,
                )
            )
        if ctx.live is not None:
            ctx.live.finished(
                request_event(
                    ex.energy, backend=ex.backend.name, status=status, finished_at=finished_at
                ),
                ex.tenant,
            )
        if ctx.request_log is not None:
            ctx.request_log.write(
                {
                    "ts": time.time(),
                    "request_id": request_id,
                    "model": ex.model,
                    "backend": ex.backend.name,
                    "category": ex.category,
                    "status": status,
                    "joules": round(report.energy_j, 6),
                    "duration_s": round(report.duration_s, 6),
                    "completion_tokens": report.tokens.completion,
                    "tenant": ex.tenant or None,
                    "client_request_id": ex.client_id,
                }
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

    def learn_queue(self, backend: Backend) -> None:
        """The backend's own running/waiting counts were just read: its queue model learns
        the capacity, and requests it now holds waiting (or admits) change weight."""
        own, ctx = backend.own, self.ctx
        if own is None:
            return
        queue = ctx.queues.get(backend.name)
        if queue is None:
            queue = ctx.queues[backend.name] = EngineQueue()
        for flight, weight in ctx.attribution.observe(queue, own.inflight, own.waiting):
            ctx.sampler.reweigh(flight.handle, weight)

    def _note_failure(self, backend: Backend, exc: UpstreamError) -> None:
        """A backend that refuses connections or breaks off answers is not ready (a
        timeout is not: a long generation may just be slow)."""
        if isinstance(exc, BackendUnreachable):
            self.ctx.registry.note_unreachable(backend, exc.message)

    # --- checks --------------------------------------------------------------------------

    async def _count_prompt(self, ex: _Exchange) -> int | None:
        """The prompt's tokens by the backend's own tokenizer, for a stream that brought
        no usage; None where it has none, or a serial server has other work in flight
        (asking it then would cut off another client's stream)."""
        b = ex.backend
        if b.spec.tokenizer is None or (b.spec.serial and b.inflight > 1):
            return None
        return await self.ctx.registry.count_tokens(b, ex.model, prompt_text(ex.payload))

    def _check_key(self, headers: list[tuple[bytes, bytes]]) -> ApiKey | None:
        """The caller's key (None when the proxy has no keys); 401 without a valid one."""
        keys = self.ctx.keys
        if not keys.enabled:
            return None
        key = keys.identify(header_value(headers, b"authorization"))
        if key is None:
            raise Unauthorized("missing or invalid API key for this proxy")
        return key

    def _category(self, headers: list[tuple[bytes, bytes]]) -> str | None:
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
        if value not in self.ctx.categories:
            allowed = ", ".join(sorted(self.ctx.categories))
            raise BadRequest(
                f"x-prompt-category {value!r} is not one of: {allowed}", code="invalid_category"
            )
        return value


# --- helpers (pure, or plain ASGI) -------------------------------------------------------


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        chunk = msg.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        if not msg.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _parse_payload(body: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("request body has no 'model' (a non-empty string)", code="missing_model")
    return payload


def _ask_for_usage(payload: dict[str, Any], body: bytes) -> tuple[bytes, bool]:
    """Make the backend send a usage chunk; returns the body to send and whether the
    client itself asked for usage (then its chunk is forwarded, else kept back)."""
    opts = payload.get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage") is True:
        return body, True
    new_opts = dict(opts) if isinstance(opts, dict) else {}
    new_opts["include_usage"] = True
    return orjson.dumps({**payload, "stream_options": new_opts}), False


def _tokens_from_usage(usage: Any, counted: int | None) -> Tokens:
    if isinstance(usage, dict):
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int | None):
            return Tokens(prompt, completion or 0, "backend")
    return Tokens(None, counted or 0, "proxy")


def _backend_auth(backend: Backend) -> list[tuple[bytes, bytes]]:
    if backend.api_key is None:
        return []
    return [(b"authorization", b"Bearer " + backend.api_key.encode("latin-1"))]


async def _watch_disconnect(receive: Receive, task: asyncio.Task[Any], ex: _Exchange) -> None:
    """Cancel the request's task if the client hangs up before the answer is complete."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            if ex.cancellable and not ex.response_done:
                ex.client_gone = True
                task.cancel()
            return


async def _send_error(
    send: Send,
    exc: ProxyError,
    id_headers: list[tuple[bytes, bytes]],
    ex: _Exchange | None = None,
) -> None:
    body = exc.body()
    if ex is not None:
        ex.started = True
        ex.response_done = True
    await send(
        {
            "type": "http.response.start",
            "status": exc.status,
            "headers": [
                *_JSON_HEADERS,
                *id_headers,
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
