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
import zlib
from dataclasses import dataclass, field
from typing import Any

from backends.backend import Backend
from backends.registry import BackendRegistry
from metering.accounting.prompt_template import prompt_shape
from metering.accounting.prompt_text import prompt_tokens_estimate
from metering.accounting.report import EnergyReport, Timings, Tokens
from metering.categories.classifier import PromptClassifier
from metering.meter import Meter
from proxy.asgi import Message, RawHeaders, Receive, Scope, Send, send_error
from proxy.auth import ApiKey, KeyRing
from proxy.budgets import BudgetBook, refuse_over_budget
from proxy.errors import (
    BackendUnreachable,
    BadRequest,
    ClientTooSlow,
    HeadersTooLarge,
    ProxyError,
    UpstreamError,
)
from proxy.headers import (
    downstream_response_headers,
    header_limit_problem,
    header_value,
    upstream_request_headers,
)
from proxy.observe.finished import Observers, RequestFinished
from proxy.observe.tracing import Tracing
from proxy.relay.encoding import (
    StreamDecoder,
    content_coding,
    decodable,
    decode_whole,
    without_coding,
)
from proxy.relay.endpoints import METERED, Endpoint
from proxy.relay.exchange import (
    CLIENT_CLOSED,
    Exchange,
    RequestIds,
    RequestPrompt,
    ask_for_usage,
    backend_auth,
    id_headers_for,
    parse_payload,
    read_body_within,
    timings_from_answer,
    tokens_from_usage,
    watch_disconnect,
)
from proxy.relay.inspectors import inspector_for
from proxy.relay.multipart import boundary_of
from proxy.relay.prompt_count import PromptCounter
from proxy.relay.router import Route, Router, output_limit
from proxy.relay.routing import backends_for_model, check_key, upstream_url
from proxy.relay.sse import SseSplitter, relay_pieces
from proxy.relay.upload import Upload
from proxy.relay.upstream import UpstreamClient, UpstreamResponse
from proxy.relay.whole_answer import read_answer, read_pieces, with_energy

log = logging.getLogger("energy_proxy.requests")

METERED_PATHS = frozenset(METERED)
MAX_MODEL_CHARS = 256
MAX_CATEGORY_CHARS = 64
# The most of a failed answer's body the proxy reads to relay it with its energy headers.
MAX_ERROR_BODY_BYTES = 1 << 20


def _more(body: bytes) -> Message:
    """A piece of the answer's body, more to come."""
    return {"type": "http.response.body", "body": body, "more_body": True}


@dataclass(slots=True)
class RelayContext:
    """What the hot path needs; built by `create_app`, never global."""

    registry: BackendRegistry
    upstream: UpstreamClient
    meter: Meter
    observers: Observers
    keys: KeyRing
    max_body_bytes: int
    router: Router  # which backend serving a model takes each request
    # decides a request's category when the client sent no x-prompt-category
    classifier: PromptClassifier = field(default_factory=PromptClassifier)
    ids: RequestIds = field(default_factory=RequestIds)
    # Seconds a client may take to send its body, or leave an answer unread.
    client_timeout_s: float = 60.0
    # Requests in flight, for the watchdog of clients that stop reading.
    exchanges: set[Exchange] = field(default_factory=set)
    tracing: Tracing | None = None  # OpenTelemetry, when on (proxy/observe/tracing.py)
    budgets: BudgetBook | None = None  # keys' energy budgets (proxy/budgets.py)


@dataclass(slots=True)
class Intake:
    """A metered request as read: what to send upstream and where."""

    payload: dict[str, Any]  # what is still needed of the parse: `stream_options` (JSON)
    body: bytes | Upload
    model: str
    route: Route  # the backend chosen and why
    category: str
    key: ApiKey | None
    stream: bool
    prompt_est: float  # the prompt's size in tokens, estimated (the split's weight)
    shape: int | None  # prompt_template.prompt_shape


def prompt_of(intake: Intake, body: bytes | Upload) -> RequestPrompt:
    """What the answer may still need of the prompt: its shape now, its text later from
    the bytes sent (an upload's plain fields as read)."""
    if isinstance(body, Upload):
        return RequestPrompt(intake.shape, fields=intake.payload)
    return RequestPrompt(intake.shape, body=body)


class MeteredRoute:
    def __init__(self, ctx: RelayContext) -> None:
        self.ctx = ctx
        self._prompts = PromptCounter(ctx.registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = self.ctx
        endpoint = METERED[scope["path"]]
        request_id, client_id, id_headers = id_headers_for(ctx.ids, scope["headers"])
        try:
            intake = await self._intake(scope, receive, endpoint)
        except ProxyError as exc:
            ctx.observers.rejected(exc.status)
            await send_error(send, exc, id_headers)
            return
        if intake is None:
            return  # the client left before sending its request
        if ctx.budgets is not None and intake.key is not None:
            verdict = ctx.budgets.check(intake.key.name)
            if verdict is not None and verdict.exceeded and not verdict.budget.soft:
                ctx.observers.rejected(429)
                await refuse_over_budget(send, verdict, id_headers, ctx.budgets.clock())
                return
            if verdict is not None:
                id_headers = [*id_headers, *verdict.headers()]
        body = intake.body
        client_wants_usage = False
        if intake.stream and endpoint.asks_for_usage:
            assert isinstance(body, bytes)
            body, client_wants_usage = ask_for_usage(intake.payload, body)
        backend = intake.route.backend
        id_headers = [*id_headers, intake.route.header()]
        measurement = ctx.meter.open(
            backend.name,
            intake.payload,
            prompt_est=intake.prompt_est,
            stream=intake.stream,
            embeddings=endpoint.all_prefill,
            serial=backend.spec.serial,
        )
        ex = Exchange(
            request_id,
            intake.model,
            intake.category,
            backend,
            measurement,
            prompt_of(intake, body),
        )
        ex.tenant = intake.key.name if intake.key is not None else ""
        ex.route = intake.route.label
        if ctx.tracing is not None:
            ex.span = ctx.tracing.start(scope["headers"], endpoint.kind, intake.model)
        del intake  # the parse is done with: only the bytes go on (RequestPrompt)
        ex.endpoint = endpoint
        ex.client_id = client_id
        traffic = backend.traffic
        ctx.router.started(backend)
        traffic.inflight += 1
        task = asyncio.current_task()
        assert task is not None
        ex.task = task
        ctx.exchanges.add(ex)
        upload = body if isinstance(body, Upload) else None
        watcher = asyncio.ensure_future(
            watch_disconnect(receive, task, ex, upload.finished if upload else None)
        )
        resp: UpstreamResponse | None = None
        ex.cancellable = True
        try:
            up_headers = self._upstream_headers(scope["headers"], backend, client_id or request_id)
            if ex.span is not None and ctx.tracing is not None:
                ctx.tracing.propagate(ex.span, up_headers)  # the backend's parent: our span
            if upload is not None and upload.length is not None:
                up_headers.append((b"content-length", upload.length))
            try:
                resp = await ctx.upstream.send(
                    "POST", upstream_url(backend, scope), up_headers, body
                )
            except UpstreamError as exc:
                failure: ProxyError = exc
                if upload is not None and upload.problem is not None:
                    failure = upload.problem  # the client's upload failed, not the backend
                    if upload.client_left:
                        ex.client_gone = True
                        return
                ex.status = failure.status
                ex.started = ex.response_done = True
                if failure is exc:
                    self._note_failure(backend, exc)
                report = self._settle(ex, None)
                await send_error(send, failure, [*id_headers, *report.headers()])
                return
            if not backend.state.ready:
                ctx.registry.note_answered(backend)
            ex.status = resp.status
            ctype = header_value(resp.headers, b"content-type") or b""
            if not 200 <= resp.status < 300:
                await self._relay_failed(resp, send, id_headers, ex)
            elif endpoint.stream_style is not None and ctype.startswith(b"text/event-stream"):
                await self._relay_stream(resp, send, id_headers, ex, client_wants_usage)
            else:
                await self._relay_whole(resp, send, id_headers, ex, ctype)
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
                await self._prompts.tally_cut(ex)

    async def _intake(self, scope: Scope, receive: Receive, endpoint: Endpoint) -> Intake | None:
        """Check and read the request; None when the client left before sending it."""
        ctx = self.ctx
        headers: RawHeaders = scope["headers"]
        limit_problem = header_limit_problem(headers)
        if limit_problem:
            raise HeadersTooLarge(limit_problem)
        key = check_key(ctx.keys, headers)
        body: bytes | Upload
        if endpoint.multipart:
            read = await self._start_upload(receive, headers)
            if read is None:
                return None
            payload, body = read
            stream = str(payload.get("stream", "")).strip().lower() == "true"
        else:
            whole = await read_body_within(receive, ctx.max_body_bytes, ctx.client_timeout_s)
            if whole is None:
                return None
            body = whole
            payload = parse_payload(whole, model_required=endpoint.model_required)
            stream = endpoint.stream_style is not None and payload.get("stream") is True
        model = payload.get("model")
        if model is not None and not isinstance(model, str):
            raise BadRequest("'model' must be a string", code="invalid_model")
        if model is not None and len(model) > MAX_MODEL_CHARS:
            raise BadRequest(
                f"'model' is longer than {MAX_MODEL_CHARS} characters", code="invalid_model"
            )
        category = self._category(headers) or ctx.classifier.classify_payload(payload)
        prompt_est, shape = prompt_tokens_estimate(payload), prompt_shape(payload)
        asked = output_limit(payload)
        if not endpoint.multipart:
            # Done with the parse before the first await: another request's intake may
            # run meanwhile, and two large parses alive at once is what memory must not
            # hold (proxy/relay/exchange.py, RequestPrompt).
            payload = {k: payload[k] for k in ("stream_options",) if k in payload}
        if model:
            backends = await backends_for_model(ctx.registry, model)
        else:
            # An API whose model is optional: the default backend and its first model.
            backends = (ctx.registry.default_backend(),)
            model = next(iter(backends[0].state.model_ids), "other")
        route = ctx.router.pick(backends, model, prompt_est, asked)
        return Intake(payload, body, model, route, category, key, stream, prompt_est, shape)

    async def _start_upload(
        self, receive: Receive, headers: RawHeaders
    ) -> tuple[dict[str, Any], Upload] | None:
        """A multipart upload's plain fields (read from its head), and the upload to
        stream upstream (its head first); None when the client left first."""
        ctx = self.ctx
        boundary = boundary_of(header_value(headers, b"content-type"))
        if boundary is None:
            raise BadRequest(
                "this endpoint takes a multipart/form-data upload", code="invalid_request"
            )
        upload = Upload(receive, ctx.max_body_bytes, ctx.client_timeout_s)
        upload.length = header_value(headers, b"content-length")
        try:
            fields = await upload.read_fields(boundary)
        except TimeoutError:
            raise ClientTooSlow(
                f"the request body did not arrive within {ctx.client_timeout_s:g} s"
            ) from None
        if fields is None:
            return None
        if "model" not in fields and len(ctx.registry.backends) > 1:
            raise BadRequest("the upload names no 'model' before its file", code="missing_model")
        return dict(fields), upload

    def _upstream_headers(
        self, headers: RawHeaders, backend: Backend, forwarded_id: str
    ) -> RawHeaders:
        return upstream_request_headers(
            headers,
            # The client's key is for the proxy: never passed on unless configured.
            drop_authorization=not backend.config.forward_authorization,
            # The client's own x-request-id header is not passed on as it came (any
            # length, any bytes): the id the proxy echoes goes instead.
            drop_request_id=True,
            extra=[
                *backend_auth(backend),
                *(
                    [(b"x-request-id", forwarded_id.encode("latin-1"))]
                    if backend.spec.forwards_request_id
                    else []
                ),
            ],
        )

    # --- answers -------------------------------------------------------------------------

    async def _send_timed(self, send: Send, ex: Exchange, message: Message) -> None:
        """A body send, timed for the watchdog of clients that stop reading."""
        ex.sending_since = time.monotonic()
        await send(message)
        ex.sending_since = 0.0

    async def _relay_whole(
        self,
        resp: UpstreamResponse,
        send: Send,
        id_headers: RawHeaders,
        ex: Exchange,
        ctype: bytes,
    ) -> None:
        """A non-streamed success: read whole (its headers must carry the energy),
        decoded if the backend compressed it, the energy spliced into a JSON object
        (proxy/relay/whole_answer.py: a large answer is read at its tail only)."""
        pieces = await read_pieces(resp)
        out = downstream_response_headers(resp.headers)
        coding = content_coding(out)
        if coding and decodable(coding):
            try:
                pieces = [decode_whole(coding, b"".join(pieces))]
                out, coding = without_coding(out), b""
            except zlib.error:
                log.warning("request %s: the backend's %s answer does not decode",
                            ex.request_id, coding.decode("latin-1"))  # fmt: skip
        answer = read_answer(pieces, ctype.startswith(b"application/json") and not coding)
        del pieces
        tokens = tokens_from_usage(answer.fields.get("usage"), None)
        report = self._settle(ex, tokens, timings_from_answer(answer.fields))
        body = with_energy(answer, ex.energy)
        del answer
        out.extend(id_headers)
        out.extend(report.headers())
        out.append((b"content-length", str(sum(len(p) for p in body)).encode()))
        ex.started = True
        await send({"type": "http.response.start", "status": resp.status, "headers": out})
        ex.response_done = True
        last = len(body) - 1
        for i, piece in enumerate(body):
            message = {"type": "http.response.body", "body": piece, "more_body": i < last}
            body[i] = b""  # sent: not held
            await self._send_timed(send, ex, message)
        if not body:
            await send({"type": "http.response.body", "body": b""})
        if tokens.prompt is not None and tokens.source == "backend":
            await self._prompts.learn_template(ex, tokens.prompt)

    async def _relay_failed(
        self, resp: UpstreamResponse, send: Send, id_headers: RawHeaders, ex: Exchange
    ) -> None:
        """A backend's error answer: its status and body as they came, with the energy
        it cost in the headers (an error's body is small: read up to a bound first)."""
        chunks: list[bytes] = []
        size = 0
        while size < MAX_ERROR_BODY_BYTES and (chunk := await resp.next_chunk()):
            chunks.append(chunk)
            size += len(chunk)
        more = size >= MAX_ERROR_BODY_BYTES
        report = self._settle(ex, None)
        out = downstream_response_headers(resp.headers)
        out.extend(id_headers)
        out.extend(report.headers())
        ex.started = True
        await send({"type": "http.response.start", "status": resp.status, "headers": out})
        await self._send_timed(send, ex, _more(b"".join(chunks)))
        while more and (chunk := await resp.next_chunk()):
            await self._send_timed(send, ex, _more(chunk))
        ex.response_done = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _relay_stream(
        self,
        resp: UpstreamResponse,
        send: Send,
        id_headers: RawHeaders,
        ex: Exchange,
        client_wants_usage: bool,
    ) -> None:
        out = downstream_response_headers(resp.headers)
        coding = content_coding(out)
        decode = StreamDecoder(coding) if coding and decodable(coding) else None
        if decode is not None:
            out = without_coding(out)
        out.extend(id_headers)
        out.append((b"x-prompt-category", ex.category.encode()))
        ex.started = True
        await send({"type": "http.response.start", "status": resp.status, "headers": out})
        splitter = SseSplitter()
        inspector = ex.inspector = inspector_for(ex.endpoint, client_wants_usage)
        failure: dict[str, Any] | None = None
        process, feed, release = inspector.process, splitter.feed, inspector.release
        meter, measurement = self.ctx.meter, ex.measurement
        meter.reached(measurement)
        counted = 0  # the tokens counted when last told to the meter
        try:
            while chunk := await resp.next_chunk():
                if decode is not None:
                    chunk = decode(chunk)
                events = feed(chunk)
                body: bytes | None
                if splitter.raw:  # an event past MAX_EVENT_BYTES: its bytes as they came
                    splitter.raw = False
                    body = relay_pieces(events, process, release)
                elif len(events) == 1:  # the usual: one whole event per chunk
                    body = process(events[0])  # type: ignore[arg-type]
                else:
                    body = relay_pieces(events, process, release)
                if measurement.decoding:
                    if inspector.counted_tokens != counted:
                        measurement.streamed(inspector.counted_tokens - counted)
                        counted = inspector.counted_tokens
                elif inspector.counted_tokens:
                    meter.first_token(measurement)
                    measurement.streamed(inspector.counted_tokens - 1)
                    counted = inspector.counted_tokens
                if body:
                    await self._send_timed(send, ex, _more(body))
        except UpstreamError as exc:
            failure = {"message": exc.message, "type": exc.type, "code": exc.code}
            ex.status = exc.status
            self._note_failure(ex.backend, exc)
        except zlib.error as exc:
            failure = {"message": f"the backend's compressed stream does not decode: {exc}",
                       "type": "upstream_error", "code": "backend_unreachable"}  # fmt: skip
            ex.status = 502
        tail = splitter.rest()
        if tail.strip():
            kept = inspector.process(tail + splitter.separator)
            if kept is not None:
                await self._send_timed(send, ex, _more(kept))
        tokens = tokens_from_usage(inspector.usage, inspector.counted_tokens)
        if tokens.prompt is None and failure is None:
            # The tokenizer's count takes up to seconds: what waits for the energy goes now.
            if early := release():
                await self._send_timed(send, ex, _more(early))
            tokens = await self._prompts.stream_tokens(ex, tokens)
        self._settle(ex, tokens, timings_from_answer(inspector.usage_chunk))
        final = inspector.closing(ex.energy, failure, splitter.separator)
        ex.response_done = True
        await self._send_timed(
            send, ex, {"type": "http.response.body", "body": final, "more_body": False}
        )

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
            endpoint=ex.endpoint.kind,
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
                span=ex.span,
                first_token_s=ex.measurement.first_token_wait_s(),
                route=ex.route,
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
