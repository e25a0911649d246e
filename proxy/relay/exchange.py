"""One request while it is in flight, and the pure or plain-ASGI helpers of the relay."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

import orjson

from backends.backend import Backend
from metering.accounting.report import EnergyReport, Timings, Tokens
from metering.meter import Measurement
from proxy.asgi import RawHeaders, Receive
from proxy.errors import BadRequest, BodyTooLarge, ClientTooSlow
from proxy.headers import client_request_id, header_value
from proxy.relay.endpoints import METERED
from proxy.relay.inspectors import Inspector

CHAT = METERED["/v1/chat/completions"]

CLIENT_CLOSED = 499  # nginx's convention for "the client closed the connection"


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
class RequestPrompt:
    """What the answer's accounting may still need of a request's prompt, without
    holding its parse for the request's life: a large body parses into several times its
    size in objects (300,000 messages: ~7x), and a request lives as long as its answer.
    `shape` is read at intake; the text is parsed again from the bytes sent upstream on
    the rare path that needs it (a stream that brought no usage, a template to learn)."""

    shape: int | None
    body: bytes | None = None  # the JSON body as sent upstream
    fields: dict[str, Any] | None = None  # a multipart upload's plain fields

    def payload(self) -> dict[str, Any]:
        if self.fields is not None:
            return self.fields
        if self.body is None:
            return {}
        try:
            doc = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return {}
        return doc if isinstance(doc, dict) else {}


class Exchange:
    """State of one request while it is in flight."""

    __slots__ = (
        "backend",
        "cancellable",
        "category",
        "client_gone",
        "client_id",
        "endpoint",
        "energy",
        "inspector",
        "measurement",
        "model",
        "prompt",
        "report",
        "request_id",
        "response_done",
        "route",
        "sending_since",
        "span",
        "started",
        "status",
        "task",
        "tenant",
    )

    def __init__(
        self,
        request_id: str,
        model: str,
        category: str,
        backend: Backend,
        measurement: Measurement,
        prompt: RequestPrompt,
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.category = category
        self.backend = backend
        self.measurement = measurement
        self.prompt = prompt
        self.client_id: str | None = None
        self.tenant = ""
        self.sending_since = 0.0  # clock time a send to the client began; 0: none pending
        self.span: Any = None  # its OpenTelemetry span, when tracing is on
        self.task: asyncio.Task[Any] | None = None
        self.client_gone = False
        self.cancellable = False  # the watcher may cancel the task only inside the try body
        self.inspector: Inspector | None = None
        self.endpoint = CHAT
        self.response_done = False
        self.started = False  # response headers sent
        self.status = 0
        self.report: EnergyReport | None = None
        self.energy: dict[str, Any] = {}
        self.route = ""  # the routing policy and why this backend (router.py `Route.label`)


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body (None when the client left first); 413 past `limit`."""
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


async def read_body_within(receive: Receive, limit: int, timeout_s: float) -> bytes | None:
    """`read_body`, with 408 when the whole body takes longer than `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            return await read_body(receive, limit)
    except TimeoutError:
        raise ClientTooSlow(f"the request body did not arrive within {timeout_s:g} s") from None


def parse_payload(body: bytes, *, model_required: bool = True) -> dict[str, Any]:
    """The request's JSON object; 400 when it is not one, or has no `model` where the
    API needs one (an API whose `model` is optional may leave it out, not make it empty)."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if model is None and not model_required:
        return payload
    if not isinstance(model, str) or not model:
        raise BadRequest("request body has no 'model' (a non-empty string)", code="missing_model")
    return payload


def ask_for_usage(payload: dict[str, Any], body: bytes) -> tuple[bytes, bool]:
    """Make the backend send a usage chunk; returns the body to send and whether the
    client itself asked for usage (then its chunk is forwarded, else kept back).
    `payload`: the request's `stream_options`, if it has any (the rest of its parse is
    not needed).

    Usage the client did not ask for stays off its chunks: vLLM's
    `continuous_usage_stats` puts usage on every chunk only with `include_usage`, so
    where the proxy adds the one it turns the other off."""
    opts = payload.get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage") is True:
        return body, True
    if "stream_options" not in payload:
        # Spliced in: a large body is not encoded again (the request carries "stream").
        end = body.rstrip()
        if end.endswith(b"}"):
            return end[:-1] + b',"stream_options":{"include_usage":true}}', False
    new_opts = dict(opts) if isinstance(opts, dict) else {}
    new_opts["include_usage"] = True
    if new_opts.get("continuous_usage_stats"):
        new_opts["continuous_usage_stats"] = False
    # `payload` may hold only what intake kept of the parse: the body is the request.
    doc = orjson.loads(body)
    return orjson.dumps({**doc, "stream_options": new_opts}), False


# More tokens than any request has (the longest contexts are a few million): a figure
# beyond it is a broken or hostile backend's, read as not said (it would overflow the
# store's sums).
MAX_USAGE_TOKENS = 100_000_000


def _count(usage: dict[str, Any], *names: str) -> int | None:
    """The first of `names` that holds a token count: an integer from 0 to
    MAX_USAGE_TOKENS (a negative, fractional or absurd figure is no count)."""
    for name in names:
        value = usage.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        if 0 <= value <= MAX_USAGE_TOKENS:
            return value
    return None


def tokens_from_usage(usage: Any, counted: int | None) -> Tokens:
    """Tokens from a backend's usage object, in each API's names: OpenAI's
    `prompt_tokens`/`completion_tokens`, the Responses and Anthropic APIs'
    `input_tokens`/`output_tokens` (Anthropic's cached input counted in), or a pooling
    API's `total_tokens` alone (all prompt). Else the proxy's own count of the output."""
    if isinstance(usage, dict):
        prompt = _count(usage, "prompt_tokens", "input_tokens")
        completion = _count(usage, "completion_tokens", "output_tokens")
        if prompt is not None and "input_tokens" in usage and "prompt_tokens" not in usage:
            prompt += sum(
                _count(usage, k) or 0
                for k in ("cache_creation_input_tokens", "cache_read_input_tokens")
            )
        if prompt is None and completion is None:
            prompt = _count(usage, "total_tokens")
        if prompt is not None:
            return Tokens(prompt, completion or 0, "backend")
    return Tokens(None, counted or 0, "proxy")


# The longest phase a backend's timings may report, seconds; beyond it they are not read.
MAX_PHASE_S = 86_400.0


def _phase_s(value: Any) -> float | None:
    """Milliseconds a backend reported, as seconds; None for anything but a finite
    number from 0 to a day (a hostile or broken backend's figure is not taken)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    s = float(value) / 1000.0
    return s if 0.0 <= s <= MAX_PHASE_S else None


def timings_from_answer(doc: Any) -> Timings | None:
    """A request's phases as its backend reported them on the answer (or the stream's
    usage chunk): vLLM's `metrics` (`--enable-per-request-metrics`: `queue_time_ms`,
    `time_to_first_token_ms` from scheduling, `generation_time_ms`) or llama.cpp's
    `timings` (`prompt_ms`, `predicted_ms`). None where there are none."""
    if not isinstance(doc, dict):
        return None
    vllm, llamacpp = doc.get("metrics"), doc.get("timings")
    if isinstance(vllm, dict):
        t = Timings(
            _phase_s(vllm.get("queue_time_ms")),
            _phase_s(vllm.get("time_to_first_token_ms")),
            _phase_s(vllm.get("generation_time_ms")),
        )
    elif isinstance(llamacpp, dict):
        t = Timings(
            None, _phase_s(llamacpp.get("prompt_ms")), _phase_s(llamacpp.get("predicted_ms"))
        )
    else:
        return None
    return t if t != Timings() else None


def backend_auth(backend: Backend) -> list[tuple[bytes, bytes]]:
    key = backend.config.api_key
    if key is None:
        return []
    return [(b"authorization", b"Bearer " + key.encode("latin-1"))]


async def watch_disconnect(
    receive: Receive, task: asyncio.Task[Any], ex: Exchange, after: asyncio.Event | None = None
) -> None:
    """Cancel the request's task if the client hangs up before the answer is complete.
    `after`: the request body is still being streamed upstream; its reader has
    `receive` until then."""
    if after is not None:
        await after.wait()
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            if ex.cancellable and not ex.response_done:
                ex.client_gone = True
                task.cancel()
            return


def id_headers_for(ids: RequestIds, headers: RawHeaders) -> tuple[str, str | None, RawHeaders]:
    """The proxy's id of a request, the client's usable own id, and the id headers of
    the answer. The store's key is always an id the proxy made; the client's own
    x-request-id, when usable, is kept beside it, forwarded and echoed."""
    request_id = ids.new()
    client_id, rejected = client_request_id(header_value(headers, b"x-request-id"))
    out = [
        (b"x-request-id", (client_id or request_id).encode("latin-1")),
        (b"x-energy-request-id", request_id.encode("latin-1")),
    ]
    if rejected:
        out.append((b"x-request-id-rejected", rejected.encode("latin-1")))
    return request_id, client_id, out
