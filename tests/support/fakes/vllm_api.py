"""A stand-in for a vLLM 0.3x OpenAI-compatible server's other endpoints (an ASGI app).

`openai_backend.py` answers chat, completions and embeddings; this one answers the rest of
vLLM's api_server, in the shapes vLLM's own source writes: /v1/responses (and GET by id),
/v1/messages (Anthropic) and its count_tokens, /v1/audio/transcriptions and /translations
(multipart), /rerank /v1/rerank /v2/rerank /score /v1/score /pooling /classify /v2/embed,
/tokenize /detokenize /invocations /health /version /metrics /v1/models[/{id}].

Headers the test sets (the proxy forwards them) switch behaviour per request:
    x-fake-gzip: 1          gzip the answer whatever accept-encoding says (streams: per event)
    x-fake-error: <status>  that status, with vLLM's error body (Anthropic's on /v1/messages*)
    x-fake-token-delay-s    sleep between streamed events
    x-fake-delay-s          sleep before answering
CORS preflights are answered as vLLM does with --allowed-origins (Starlette's middleware).
"""

from __future__ import annotations

import asyncio
import bisect
import io
import itertools
import json
import math
import re
import time
import uuid
import wave
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_TOKENS = ("Hello", ",", " energy", " world", "!")
# Where the recorder leaves a request's entry in the ASGI scope, for the handler to add to.
_RECORD = "fake_vllm_record"
# POSTs that make the engine work (what vllm:num_requests_running counts); these do not.
_NOT_WORK = frozenset({"/tokenize", "/detokenize", "/v1/messages/count_tokens"})
_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}

Handler = Callable[[Request, dict[str, Any], str], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass
class VllmApiState:
    models: list[str] = field(default_factory=lambda: ["fake-model"])
    tokens: tuple[str, ...] = DEFAULT_TOKENS
    version: str = "0.32.0"
    max_model_len: int = 8192
    # None: any Origin, echoed back (as vLLM does when --allowed-origins lists the caller).
    allowed_origins: list[str] | None = None
    # vLLM answers response_format=text with the JSON body all the same (its router dumps
    # the response model whatever the format); True answers text/plain, as OpenAI does.
    plain_text_transcripts: bool = False
    # Every request as it arrives (preflights too): method, path, query, headers,
    # body_size, chunked, and body if JSON; every multipart upload, part by part.
    requests: list[dict[str, Any]] = field(default_factory=list)
    uploads: list[dict[str, Any]] = field(default_factory=list)
    # Responses API answers by id, for GET /v1/responses/{id} (vLLM's store).
    responses: dict[str, dict[str, Any]] = field(default_factory=dict)
    # vLLM-style /metrics: requests being worked on now, plus `bypass_running` more, as if
    # other clients reached the backend around the proxy.
    running: int = 0
    bypass_running: int = 0
    waiting: int = 0
    prompt_tokens_served: int = 0
    completion_tokens_served: int = 0


def make_vllm_api_backend(state: VllmApiState | None = None) -> tuple[Starlette, VllmApiState]:
    st = state or VllmApiState()

    def endpoint(handler: Handler, anthropic: bool, form: bool) -> Endpoint:
        async def run(request: Request) -> Response:
            # The body is read first, whatever the answer: the recorder counts its bytes.
            try:
                body = await _read_form(request, st) if form else _json(await request.body())
            except ValueError as exc:
                return _error(400, str(exc), anthropic=anthropic)
            request.scope[_RECORD]["body"] = None if form else body  # forms: state.uploads
            h = request.headers
            if "x-fake-delay-s" in h:
                await asyncio.sleep(float(h["x-fake-delay-s"]))
            if "x-fake-error" in h:
                return _error(int(h["x-fake-error"]), "fake backend error", anthropic=anthropic)
            if (model := body.get("model") or st.models[0]) not in st.models:
                msg = f"The model `{model}` does not exist."
                return _error(404, msg, param="model", anthropic=anthropic)
            try:
                return await handler(request, body, str(model))
            except (TypeError, ValueError, KeyError, AttributeError) as exc:
                # As vLLM does: a malformed request is a 400, never a crash.
                return _error(400, f"malformed request: {exc!r}", anthropic=anthropic)

        return run

    def sse(request: Request, events: list[tuple[str, int]]) -> StreamingResponse:
        # Each event is (its SSE text, the tokens in it): counted when sent, as vLLM counts.
        delay = float(request.headers.get("x-fake-token-delay-s", "0"))

        async def gen() -> AsyncIterator[str]:
            for i, (event, made) in enumerate(events):
                if i and delay:
                    await asyncio.sleep(delay)
                st.completion_tokens_served += made
                yield event

        return StreamingResponse(gen(), media_type="text/event-stream")

    def generate(prompt: int, limit: int, stream: bool) -> list[str]:
        """The canned answer, cut at `limit` tokens; counted at once unless streamed."""
        toks = list(st.tokens[: max(0, limit)])
        st.prompt_tokens_served += prompt
        st.completion_tokens_served += 0 if stream else len(toks)
        return toks

    # --- OpenAI Responses API (vllm/entrypoints/openai/responses) ---

    async def responses(request: Request, body: dict[str, Any], model: str) -> Response:
        prompt = _count(body.get("instructions"), body.get("input"))
        max_out = st.max_model_len - prompt
        if (limit := body.get("max_output_tokens")) is not None:
            if int(limit) < 1:
                raise ValueError("max_output_tokens must be at least 1")
            max_out = min(int(limit), max_out)
        toks = generate(prompt, max_out, bool(body.get("stream")))
        finished, text = len(toks) == len(st.tokens), "".join(toks)
        rid, mid = f"resp_{_hex()}", f"msg_{_hex()}"
        get = body.get
        # ResponsesResponse.from_request: every field, the request's settings echoed back.
        base: dict[str, Any] = {
            "id": rid, "created_at": int(time.time()), "incomplete_details": None,
            "instructions": get("instructions"), "metadata": get("metadata"), "model": model,
            "object": "response", "output": [],
            "parallel_tool_calls": get("parallel_tool_calls", True),
            "temperature": 1.0 if get("temperature") is None else get("temperature"),
            "tool_choice": get("tool_choice", "auto"), "tools": get("tools", []),
            "top_p": 1.0 if get("top_p") is None else get("top_p"),
            "background": get("background", False), "max_output_tokens": max_out,
            "max_tool_calls": get("max_tool_calls"),
            "previous_response_id": get("previous_response_id"), "prompt": None,
            "reasoning": get("reasoning"), "service_tier": get("service_tier", "auto"),
            "status": "in_progress", "text": get("text"), "top_logprobs": None,
            "truncation": get("truncation", "disabled"), "usage": None, "user": get("user"),
            "input_messages": None, "output_messages": None,
        }  # fmt: skip
        part: dict[str, Any] = {"annotations": [], "text": text, "type": "output_text",
                                "logprobs": None}  # fmt: skip
        item = {"id": mid, "content": [part], "role": "assistant", "status": "completed",
                "type": "message"}  # fmt: skip
        usage = {"input_tokens": prompt, "output_tokens": len(toks),
                 "total_tokens": prompt + len(toks), "input_tokens_details": {"cached_tokens": 0,
                 "input_tokens_per_turn": [], "cached_tokens_per_turn": []},
                 "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0,
                 "output_tokens_per_turn": [], "tool_output_tokens_per_turn": []}}  # fmt: skip
        final = {**base, "output": [item], "usage": usage, "status": "completed"}
        if not finished:
            final.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
        if body.get("store", True):
            st.responses[rid] = final
        if not body.get("stream"):
            return JSONResponse(final)
        seq = itertools.count()

        def ev(kind: str, made: int = 0, **fields: Any) -> tuple[str, int]:
            data = {**fields, "sequence_number": next(seq), "type": kind}
            return f"event: {kind}\ndata: {_dumps(data)}\n\n", made

        at: dict[str, Any] = {"item_id": mid, "output_index": 0, "content_index": 0}
        events = [
            ev("response.created", response=base),
            ev("response.in_progress", response=base),
            ev("response.output_item.added", output_index=0,
               item={**item, "content": [], "status": "in_progress"}),
            ev("response.content_part.added", **at, part={**part, "text": "", "logprobs": []}),
            *(ev("response.output_text.delta", 1, **at, delta=t, logprobs=[]) for t in toks),
            ev("response.output_text.done", **at, logprobs=[], text=text),
            ev("response.content_part.done", **at, part=part),
            # vLLM hands these two to the message item as extra fields, and they show.
            ev("response.output_item.done", output_index=0,
               item={**item, "annotations": [], "logprobs": []}),
            ev("response.completed", response=final),
        ]  # fmt: skip
        return sse(request, events)

    async def get_response(request: Request) -> Response:
        rid = request.path_params["response_id"]
        if rid not in st.responses:
            msg = f"Response with id '{rid}' not found."
            return _error(404, msg, param="response_id", err_type="invalid_request_error")
        return JSONResponse(st.responses[rid])

    # --- Anthropic Messages API (vllm/entrypoints/anthropic) ---

    async def messages(request: Request, body: dict[str, Any], model: str) -> Response:
        if (max_tokens := int(body["max_tokens"])) <= 0:
            raise ValueError("max_tokens must be positive")
        prompt = _count(body.get("system"), body.get("messages"))
        toks = generate(prompt, max_tokens, bool(body.get("stream")))
        stop = "end_turn" if len(toks) == len(st.tokens) else "max_tokens"
        # vLLM converts a chat completion and keeps its id: "chatcmpl-", not "msg_".
        mid, usage = f"chatcmpl-{_hex()}", {"input_tokens": prompt, "output_tokens": len(toks)}
        if not body.get("stream"):
            # Dumped with exclude_none: no stop_sequence key when there is none.
            return JSONResponse({"id": mid, "type": "message", "role": "assistant",
                                 "content": [{"type": "text", "text": "".join(toks)}],
                                 "model": model, "stop_reason": stop, "usage": usage})  # fmt: skip

        def ev(data: dict[str, Any], made: int = 0) -> tuple[str, int]:
            return f"event: {data['type']}\ndata: {_dumps(data)}\n\n", made

        # Dumped with exclude_unset: message_start's message has no type or role, and
        # message_delta's delta no stop_sequence.
        start: dict[str, Any] = {"id": mid, "content": [], "model": model, "stop_reason": None,
            "stop_sequence": None, "usage": {**usage, "output_tokens": 0}}  # fmt: skip
        events = [
            ev({"type": "message_start", "message": start}),
            ev({"type": "content_block_start", "content_block": {"type": "text", "text": ""},
                "index": 0}),
            *(ev({"type": "content_block_delta", "delta": {"type": "text_delta", "text": t},
                  "index": 0}, 1) for t in toks),
            ev({"type": "content_block_stop", "index": 0}),
            ev({"type": "message_delta", "delta": {"stop_reason": stop}, "usage": usage}),
            ev({"type": "message_stop"}),
        ]  # fmt: skip
        return sse(request, events)

    async def count_tokens(_: Request, body: dict[str, Any], model: str) -> Response:
        n = _count(body.get("system"), body.get("messages"))
        return JSONResponse({"input_tokens": n,
                             "context_management": {"original_input_tokens": n}})  # fmt: skip

    # --- Audio (vllm/entrypoints/openai/speech_to_text) ---

    async def audio(request: Request, body: dict[str, Any], model: str) -> Response:
        translate = request.url.path.endswith("/translations")
        if not isinstance(data := body.get("file"), bytes):
            raise ValueError("'file' must be an uploaded file")
        fmt, stream = body.get("response_format", "json"), _flag(body.get("stream"))
        if fmt not in ("json", "text"):  # vLLM's words for verbose_json, on a model
            # without segment timestamps (it refuses srt and vtt outright)
            raise ValueError(f"Currently do not support {fmt} for {model}")
        prompt = _count(body.get("prompt"))
        toks = generate(prompt, len(st.tokens), stream)
        if not stream:
            if fmt == "text" and st.plain_text_transcripts:
                return PlainTextResponse("".join(toks))
            # Usage only for transcriptions, in whole seconds rounded up (vLLM: "as per
            # OpenAI specs"); a translation's answer has none.
            seconds = math.ceil(_audio_seconds(data))
            usage = {} if translate else {"usage": {"type": "duration", "seconds": seconds}}
            return JSONResponse({"text": "".join(toks), **usage})
        task, obj = ("translate", "translation") if translate else ("transcribe", "transcription")
        rid, created = f"{task}-{_hex()}", int(time.time())
        include_usage = _flag(body.get("stream_include_usage"))
        continuous = include_usage and _flag(body.get("stream_continuous_usage_stats"))

        def chunk(choices: list[dict[str, Any]], made: int, done: int | None) -> tuple[str, int]:
            d: dict[str, Any] = {"id": rid, "object": f"{obj}.chunk", "created": created,
                                 "model": model, "choices": choices}  # fmt: skip
            if done is not None:
                d["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt + done,
                              "completion_tokens": done}  # fmt: skip
            return f"data: {_dumps(d)}\n\n", made

        events = []
        for i, t in enumerate(toks, 1):
            last = {"finish_reason": "stop", "stop_reason": None} if i == len(toks) else {}
            events.append(chunk([{"delta": {"content": t}, **last}], 1, i if continuous else None))
        if include_usage:
            events.append(chunk([], 0, len(toks)))
        return sse(request, [*events, ("data: [DONE]\n\n", 0)])

    # --- Pooling models (vllm/entrypoints/pooling, vllm/entrypoints/cohere) ---

    def listing(kind: str, model: str, data: list[dict[str, Any]], n: int) -> Response:
        generate(n, 0, False)
        return JSONResponse({"id": f"{kind}-{_hex()}", "object": "list",
                             "created": int(time.time()), "model": model, "data": data,
                             "usage": _usage(n)})  # fmt: skip

    async def rerank(_: Request, body: dict[str, Any], model: str) -> Response:
        query, docs = _text(body["query"]), body["documents"]
        docs = docs if isinstance(docs, list) else [docs]
        results: list[dict[str, Any]] = [
            {"index": i, "document": {"text": _text(d), "multi_modal": None},
             "relevance_score": _similarity(query, _text(d))} for i, d in enumerate(docs)
        ]  # fmt: skip
        results.sort(key=lambda r: -float(r["relevance_score"]))
        n = sum(_count(query, d) for d in docs)
        generate(n, 0, False)
        top_n = int(body.get("top_n") or 0) or None
        return JSONResponse({"id": f"rerank-{_hex()}", "model": model, "results": results[:top_n],
                             "usage": {"prompt_tokens": n, "total_tokens": n}})  # fmt: skip

    async def score(_: Request, body: dict[str, Any], model: str) -> Response:
        left = next(body[k] for k in ("text_1", "queries", "data_1") if k in body)
        right = next(body[k] for k in ("text_2", "documents", "items", "data_2") if k in body)
        lefts = left if isinstance(left, list) else [left]
        rights = right if isinstance(right, list) else [right]
        pairs = list(zip(lefts * len(rights) if len(lefts) == 1 else lefts, rights, strict=True))
        data = [{"index": i, "object": "score", "score": _similarity(_text(a), _text(b))}
                for i, (a, b) in enumerate(pairs)]  # fmt: skip
        return listing("score", model, data, sum(_count(a, b) for a, b in pairs))

    async def pooling(request: Request, body: dict[str, Any], model: str) -> Response:
        raw = body["messages"] if "messages" in body else body["input"]
        # One input is a string, a message list or a list of token ids; else it is a batch.
        inputs = [raw] if isinstance(raw, str) or "messages" in body or _is_ids(raw) else raw
        n = sum(len(x) if _is_ids(x) else _count(x) for x in inputs)
        if request.url.path == "/classify":
            data = [{"index": i, "label": "positive", "probs": [0.25, 0.75], "num_classes": 2}
                    for i in range(len(inputs))]  # fmt: skip
            return listing("classify", model, data, n)
        data = [{"index": i, "object": "pooling", "data": _vector(i)} for i in range(len(inputs))]
        return listing("pool", model, data, n)

    async def cohere_embed(_: Request, body: dict[str, Any], model: str) -> Response:
        texts = body.get("texts")
        items = texts if texts is not None else [_text(x) for x in body["inputs"]]
        if any(t != "float" for t in body.get("embedding_types") or ["float"]):
            raise ValueError("this fake makes float embeddings only")
        n = sum(_count(t) for t in items)
        generate(n, 0, False)
        # Dumped with exclude_none: `texts` only when the request sent texts.
        return JSONResponse({"id": f"embd-{_hex()}",
            "embeddings": {"float": [_vector(i) for i in range(len(items))]},
            **({"texts": texts} if texts is not None else {}), "meta": {"api_version": {
            "version": "2"}, "billed_units": {"input_tokens": n, "image_tokens": 0}},
            "response_type": "embeddings_by_type"})  # fmt: skip

    async def tokenize(_: Request, body: dict[str, Any], model: str) -> Response:
        n = _count(body["messages"] if "messages" in body else body["prompt"])
        return JSONResponse({"count": n, "max_model_len": st.max_model_len,
                             "tokens": list(range(n)), "token_strs": None})  # fmt: skip

    async def detokenize(_: Request, body: dict[str, Any], model: str) -> Response:
        return JSONResponse({"prompt": " ".join(f"t{int(t)}" for t in body["tokens"])})

    async def invocations(_: Request, body: dict[str, Any], model: str) -> Response:
        # vLLM picks the handler by the body's shape; here, a non-streamed chat one.
        if not isinstance(body.get("messages"), list) or body.get("stream"):
            raise ValueError("this fake answers only non-streamed chat on /invocations")
        prompt = _count(body["messages"])
        toks = generate(prompt, int(body.get("max_tokens") or len(st.tokens)), False)
        message = {"role": "assistant", "content": "".join(toks), "tool_calls": []}
        finish = "stop" if len(toks) == len(st.tokens) else "length"
        choice = {"index": 0, "message": message, "logprobs": None, "stop_reason": None,
                  "finish_reason": finish}  # fmt: skip
        return JSONResponse({"id": f"chatcmpl-{_hex()}", "object": "chat.completion",
                             "created": int(time.time()), "model": model, "choices": [choice],
                             "usage": _usage(prompt, len(toks))})  # fmt: skip

    def card(m: str) -> dict[str, Any]:
        now, no, yes = int(time.time()), False, True
        return {"id": m, "object": "model", "created": now, "owned_by": "vllm", "root": m,
                "parent": None, "max_model_len": st.max_model_len, "permission": [{
                    "id": f"modelperm-{_hex()}", "object": "model_permission", "created": now,
                    "allow_create_engine": no, "allow_sampling": yes, "allow_logprobs": yes,
                    "allow_search_indices": no, "allow_view": yes, "allow_fine_tuning": no,
                    "organization": "*", "group": None, "is_blocking": no}]}  # fmt: skip

    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [card(m) for m in st.models]})

    async def model(request: Request) -> Response:
        if (m := request.path_params["model_id"]) not in st.models:
            return _error(404, f"The model `{m}` does not exist.", param="model")
        return JSONResponse(card(m))

    async def metrics(_: Request) -> Response:
        label = f'{{model_name="{st.models[0]}"}}'
        text = "".join(
            f"# TYPE vllm:{name} {kind}\nvllm:{name}{suffix}{label} {value}.0\n"
            for name, kind, suffix, value in (
                ("num_requests_running", "gauge", "", st.running + st.bypass_running),
                ("num_requests_waiting", "gauge", "", st.waiting),
                ("prompt_tokens", "counter", "_total", st.prompt_tokens_served),
                ("generation_tokens", "counter", "_total", st.completion_tokens_served),
            )
        )
        return Response(text, media_type="text/plain; version=0.0.4")

    posts: list[tuple[str, Handler]] = [
        ("/v1/responses", responses), ("/v1/messages", messages),
        ("/v1/messages/count_tokens", count_tokens),
        ("/v1/audio/transcriptions", audio), ("/v1/audio/translations", audio),
        ("/rerank", rerank), ("/v1/rerank", rerank), ("/v2/rerank", rerank),
        ("/score", score), ("/v1/score", score), ("/pooling", pooling),
        ("/classify", pooling), ("/v2/embed", cohere_embed), ("/tokenize", tokenize),
        ("/detokenize", detokenize), ("/invocations", invocations),
    ]  # fmt: skip
    routes = [
        Route(p, endpoint(h, p.startswith("/v1/messages"), p.startswith("/v1/audio/")),
              methods=["POST"]) for p, h in posts
    ] + [
        Route("/v1/models", models), Route("/v1/models/{model_id:path}", model),
        Route("/v1/responses/{response_id}", get_response), Route("/metrics", metrics),
        Route("/health", lambda _: Response(b"")),
        Route("/version", lambda _: JSONResponse({"version": st.version})),
    ]  # fmt: skip
    # As vLLM: Starlette's own CORSMiddleware, methods and headers "*" (its defaults).
    origins = {"allow_origins": st.allowed_origins} if st.allowed_origins else {
        "allow_origin_regex": ".*"}  # fmt: skip
    middleware = [
        Middleware(_recorder, state=st),
        Middleware(CORSMiddleware, allow_methods=["*"], allow_headers=["*"], **origins),
        Middleware(_force_gzip),
    ]
    return Starlette(routes=routes, middleware=middleware), st


def _recorder(app: ASGIApp, state: VllmApiState) -> ASGIApp:
    """Record each request as it arrives (CORS preflights too: they never reach a route),
    count its body's bytes as the app reads them, and count work in flight."""

    async def record(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        entry: dict[str, Any] = {"method": scope["method"], "path": scope["path"],
            "query": scope["query_string"].decode("latin-1"), "headers": headers, "body_size": 0,
            "chunked": "chunked" in headers.get("transfer-encoding", "").lower()}  # fmt: skip
        state.requests.append(entry)
        scope[_RECORD] = entry

        async def counting() -> Message:
            message = await receive()
            entry["body_size"] += len(message.get("body", b""))
            return message

        work = scope["method"] == "POST" and scope["path"] not in _NOT_WORK
        state.running += work
        try:
            await app(scope, counting, send)
        finally:
            state.running -= work

    return record


def _force_gzip(app: ASGIApp) -> ASGIApp:
    """x-fake-gzip: 1 gzips the answer even when accept-encoding refuses it (some servers
    do), each body message flushed (Z_SYNC_FLUSH): a streamed event inflates on arrival."""

    async def gzip_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (b"x-fake-gzip", b"1") not in scope["headers"]:
            await app(scope, receive, send)
            return
        comp = zlib.compressobj(wbits=31)
        start: Message | None = None

        async def compressing(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message  # held back until the body shows whether it is all there
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            more = message.get("more_body", False)
            data = comp.compress(message.get("body", b""))
            data += comp.flush(zlib.Z_SYNC_FLUSH if more else zlib.Z_FINISH)
            if start is not None:
                drop = (b"content-length", b"content-encoding")
                headers = [(k, v) for k, v in start["headers"] if k.lower() not in drop]
                headers.append((b"content-encoding", b"gzip"))
                if not more:  # all of it in one message: its compressed length is known
                    headers.append((b"content-length", str(len(data)).encode()))
                await send({**start, "headers": headers})
                start = None
            await send({**message, "body": data})

        await app(scope, receive, compressing)

    return gzip_app


async def _read_form(request: Request, st: VllmApiState) -> dict[str, Any]:
    """Parse a multipart/form-data body by hand (no python-multipart needed), recording
    each part in arrival order and which body chunk its headers came in."""
    ctype = request.headers.get("content-type", "")
    found = re.search(r'boundary="?([^";]+)"?', ctype)
    if not ctype.startswith("multipart/form-data") or found is None:
        raise ValueError("expected a multipart/form-data body")
    chunks = [c async for c in request.stream() if c]
    raw, ends = b"".join(chunks), list(itertools.accumulate(len(c) for c in chunks))
    length = request.headers.get("content-length")
    upload: dict[str, Any] = {
        "path": request.url.path, "chunked": request.scope[_RECORD]["chunked"],
        "content_length": None if length is None else int(length),
        "body_chunks": len(chunks), "parts": [], "file_size": None, "filename": None,
    }  # fmt: skip
    st.uploads.append(upload)
    fields: dict[str, Any] = {}
    delim = b"--" + found.group(1).encode()
    if (pos := raw.find(delim)) < 0:
        raise ValueError("no multipart boundary in the body")
    while raw[pos + len(delim) : pos + len(delim) + 2] != b"--":
        pos += len(delim)
        head_end = raw.find(b"\r\n\r\n", pos)
        end = raw.find(b"\r\n" + delim, head_end)
        head = raw[pos:head_end].decode("latin-1")
        name = re.search(r'\bname="([^"]*)"', head)
        filename = re.search(r'\bfilename="([^"]*)"', head)
        ptype = re.search(r"content-type:\s*(\S+)", head, re.IGNORECASE)
        if head_end < 0 or end < 0 or name is None:
            raise ValueError("a truncated multipart body, or a part without a name")
        payload, fname = raw[head_end + 4 : end], filename and filename.group(1)
        upload["parts"].append({"name": name.group(1), "filename": fname, "size": len(payload),
                                "content_type": ptype and ptype.group(1),
                                "chunk": bisect.bisect_right(ends, pos)})  # fmt: skip
        fields[name.group(1)] = payload if filename else payload.decode()
        if name.group(1) == "file":
            upload.update(file_size=len(payload), filename=fname)
        pos = end + 2
    return fields


def _json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict):
        return body
    raise ValueError("the body must be a JSON object")


def _error(status: int, message: str, *, param: str | None = None, anthropic: bool = False,
           err_type: str | None = None) -> JSONResponse:  # fmt: skip
    kind = err_type or _ERROR_TYPES.get(status, "BadRequestError")
    if anthropic:  # vLLM's translate_error_response: Anthropic's envelope, the same type
        return JSONResponse({"type": "error", "error": {"type": kind, "message": message}},
                            status_code=status)  # fmt: skip
    error = {"message": message, "type": kind, "param": param, "code": status}
    return JSONResponse({"error": error}, status_code=status)


def _usage(prompt: int, completion: int = 0) -> dict[str, Any]:  # vLLM's UsageInfo, whole
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion,
            "completion_tokens": completion, "prompt_tokens_details": None}  # fmt: skip


def _text(value: Any) -> str:
    """The words in a request field however nested (a string, content parts, messages)."""
    if isinstance(value, dict):
        value = [value.get("text"), value.get("content")]
    if isinstance(value, list):
        return " ".join(_text(v) for v in value)
    return value if isinstance(value, str) else ""


def _count(*values: Any) -> int:  # a stand-in for tokenisation: words, at least 1
    return max(1, sum(len(_text(v).split()) for v in values))


def _is_ids(value: Any) -> bool:  # a list of token ids (a pooling input, as a string is)
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) for v in value)


def _similarity(a: str, b: str) -> float:  # relevance in [0, 1): b's words a shares
    words = set(b.lower().split())
    return round(len(set(a.lower().split()) & words) / (len(words) + 1), 6)


def _vector(i: int) -> list[float]:
    return [round(0.1 * (i + 1), 3), 0.2, 0.3]


def _audio_seconds(data: bytes) -> float:
    try:
        with wave.open(io.BytesIO(data)) as w:
            return float(w.getnframes() / w.getframerate())
    except (wave.Error, EOFError):
        return len(data) / 32000  # not a WAV: as if 16 kHz 16-bit mono PCM


def _flag(value: Any) -> bool:  # a form field, read as pydantic reads a bool
    return str(value).lower() in ("true", "1", "yes", "on")


def _dumps(data: Any) -> str:  # as pydantic's model_dump_json writes it: no spaces
    return json.dumps(data, separators=(",", ":"))


def _hex() -> str:  # vLLM's random_uuid
    return uuid.uuid4().hex
