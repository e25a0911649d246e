"""A small fake OpenAI-compatible server for the proxy's tests (an ASGI app).

Runs in-process behind `httpx.ASGITransport` or on a real socket under uvicorn.
Behaviour per request comes from headers the test sets (the proxy forwards them):

    x-fake-delay-s          sleep before answering
    x-fake-token-delay-s    sleep between streamed tokens
    x-fake-error            answer with this status and an OpenAI-style error body
    x-fake-die-after        stream this many tokens, then break the connection
    x-fake-no-usage         never send usage (like llama-cpp-python's server in streams)
    x-fake-sep              "crlf" to end events with CRLF CRLF (like sse-starlette)

It records what it received (`requests`) and how many streams the client abandoned
(`abandoned`), so tests can check what the proxy sent and that it hung up upstream.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

DEFAULT_TOKENS = ("Hello", ",", " energy", " world", "!")


@dataclass
class FakeState:
    models: list[str] = field(default_factory=lambda: ["fake-model"])
    tokens: tuple[str, ...] = DEFAULT_TOKENS
    requests: list[dict[str, Any]] = field(default_factory=list)
    abandoned: int = 0
    completed_streams: int = 0
    models_calls: int = 0
    # vLLM-style /metrics: requests running now (those delayed by x-fake-delay-s), plus
    # `bypass_running` more, as if other clients reached the backend around the proxy.
    running: int = 0
    bypass_running: int = 0
    exports_metrics: bool = True
    tokenize_calls: int = 0
    # vLLM-style token counters: tokens of every answer it served (as vLLM counts them).
    prompt_tokens_served: int = 0
    completion_tokens_served: int = 0
    # Streams die after this many tokens, for every request (x-fake-die-after: for one).
    die_after: int | None = None


def make_fake_backend(state: FakeState | None = None) -> tuple[Starlette, FakeState]:
    st = state or FakeState()

    async def models(_: Request) -> Response:
        st.models_calls += 1
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": m, "object": "model", "owned_by": "fake"} for m in st.models],
            }
        )

    async def completions(request: Request) -> Response:
        # As a real server does: a malformed request is a 400, never a crash (a 500 from
        # here would look like the proxy's own to the fuzz tests).
        try:
            return await answer(request)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            return JSONResponse(
                {
                    "error": {
                        "message": f"malformed request: {exc}",
                        "type": "invalid_request_error",
                        "code": 400,
                    }
                },
                status_code=400,
            )

    async def answer(request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return JSONResponse(
                {
                    "error": {
                        "message": "the body must be a JSON object",
                        "type": "invalid_request_error",
                        "code": 400,
                    }
                },
                status_code=400,
            )
        st.requests.append(
            {"path": request.url.path, "body": body, "headers": dict(request.headers)}
        )
        h = request.headers
        if "x-fake-delay-s" in h:
            st.running += 1
            try:
                await asyncio.sleep(float(h["x-fake-delay-s"]))
            finally:
                st.running -= 1
        if "x-fake-error" in h:
            status = int(h["x-fake-error"])
            return JSONResponse(
                {"error": {"message": "fake backend error", "type": "fake", "code": status}},
                status_code=status,
            )
        if body.get("model") not in st.models:
            return JSONResponse(
                {"error": {"message": "model not found", "type": "NotFound", "code": 404}},
                status_code=404,
            )
        path = request.url.path
        messages = body.get("messages", [])
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            # As a real server does: a 400 for a malformed request, never a crash (a 500
            # from here would look like the proxy's to the fuzz tests).
            return JSONResponse(
                {
                    "error": {
                        "message": "messages must be a list of objects",
                        "type": "invalid_request_error",
                        "code": 400,
                    }
                },
                status_code=400,
            )
        prompt_tokens = _prompt_tokens(body)
        if path == "/v1/embeddings":
            inputs = body.get("input")
            n = len(inputs) if isinstance(inputs, list) else 1
            return JSONResponse(
                {
                    "object": "list",
                    "data": [
                        {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
                        for i in range(n)
                    ],
                    "model": body["model"],
                    "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
                }
            )
        max_tokens = int(body.get("max_tokens") or len(st.tokens))
        if not 0 < max_tokens <= 100_000:
            raise ValueError(f"max_tokens must be 1..100000, got {max_tokens}")
        tokens = [st.tokens[i % len(st.tokens)] for i in range(max_tokens)]
        chat = path == "/v1/chat/completions"
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(tokens),
            "total_tokens": prompt_tokens + len(tokens),
        }
        # As vLLM counts: the prompt when it is read, each answer token as it is made (a
        # stream cut off early counts only the tokens it made).
        st.prompt_tokens_served += prompt_tokens
        if not body.get("stream"):
            st.completion_tokens_served += len(tokens)
        cid = "cmpl-fake-1"
        created = int(time.time())
        # x-fake-timings: the answer carries the request's phases as vLLM (`metrics`, with
        # --enable-per-request-metrics) or llama.cpp (`timings`) report them; the value
        # after the kind is "queue_ms,prefill_ms,decode_ms".
        timings: dict[str, Any] = {}
        if "x-fake-timings" in h:
            kind, _, figures = h["x-fake-timings"].partition(":")
            q_ms, p_ms, d_ms = (float(x) for x in figures.split(","))
            if kind == "vllm":
                timings["metrics"] = {
                    "queue_time_ms": q_ms,
                    "time_to_first_token_ms": p_ms,
                    "generation_time_ms": d_ms,
                }
            else:
                timings["timings"] = {"prompt_n": prompt_tokens, "prompt_ms": p_ms,
                                      "predicted_n": max_tokens, "predicted_ms": d_ms}  # fmt: skip
        if not body.get("stream"):
            text = "".join(tokens)
            choice: dict[str, Any] = (
                {"index": 0, "message": {"role": "assistant", "content": text}}
                if chat
                else {"index": 0, "text": text}
            )
            choice["finish_reason"] = "length"
            return JSONResponse(
                {
                    "id": cid,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": created,
                    "model": body["model"],
                    "choices": [choice],
                    "usage": usage,
                    **timings,
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if "x-fake-no-usage" in h:
            include_usage = False
        sep = "\r\n\r\n" if h.get("x-fake-sep") == "crlf" else "\n\n"
        token_delay_s = float(h.get("x-fake-token-delay-s", "0"))
        die_after = int(h["x-fake-die-after"]) if "x-fake-die-after" in h else st.die_after
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> str:
            d: dict[str, Any] = {
                "id": cid,
                "object": obj,
                "created": created,
                "model": body["model"],
                "choices": choices,
            }
            if include_usage:
                d["usage"] = None
            d.update(extra or {})
            return "data: " + json.dumps(d, separators=(",", ":")) + sep

        async def events() -> AsyncIterator[str]:
            finished = False
            try:
                if chat:
                    yield chunk([{"index": 0, "delta": {"role": "assistant"}}])
                for i, tok in enumerate(tokens):
                    if die_after is not None and i >= die_after:
                        raise ConnectionError("fake backend dies mid-stream")
                    if token_delay_s:
                        await asyncio.sleep(token_delay_s)
                    piece = {"content": tok} if chat else None
                    st.completion_tokens_served += 1
                    yield chunk(
                        [{"index": 0, "delta": piece}] if chat else [{"index": 0, "text": tok}]
                    )
                yield chunk([{"index": 0, "delta": {}, "finish_reason": "length"}])
                if include_usage:
                    yield chunk([], {"usage": usage, **timings})
                yield "data: [DONE]" + sep
                finished = True
                st.completed_streams += 1
            finally:
                if not finished:
                    st.abandoned += 1

        return StreamingResponse(events(), media_type="text/event-stream")

    async def metrics(_: Request) -> Response:
        if not st.exports_metrics:
            return Response("not found", status_code=404)
        running = st.running + st.bypass_running
        text = (
            "# HELP vllm:num_requests_running Number of requests currently running on GPU.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            + "".join(
                f'vllm:num_requests_running{{model_name="{m}"}} {running if i == 0 else 0}.0\n'
                for i, m in enumerate(st.models)
            )
        )
        text += (
            "# TYPE vllm:prompt_tokens counter\n"
            f'vllm:prompt_tokens_total{{model_name="{st.models[0]}"}} '
            f"{st.prompt_tokens_served}.0\n"
            "# TYPE vllm:generation_tokens counter\n"
            f'vllm:generation_tokens_total{{model_name="{st.models[0]}"}} '
            f"{st.completion_tokens_served}.0\n"
        )
        return Response(text, media_type="text/plain; version=0.0.4")

    async def tokenize(request: Request) -> Response:
        # llama-cpp-python's shape: POST /extras/tokenize {"input", "model"} -> {"tokens"}
        if request.headers.get("content-type") != "application/json":
            return JSONResponse({"detail": "expected a JSON body"}, status_code=422)
        body = json.loads(await request.body())
        st.tokenize_calls += 1
        return JSONResponse({"tokens": list(range(_prompt_tokens({"input": body["input"]})))})

    async def vllm_tokenize(request: Request) -> Response:
        # vLLM's shape: POST /tokenize {"model", "prompt"} -> {"count", "tokens", ...}
        body = json.loads(await request.body())
        st.tokenize_calls += 1
        n = _prompt_tokens({"prompt": body["prompt"]})
        return JSONResponse({"count": n, "max_model_len": 8192, "tokens": list(range(n))})

    app = Starlette(
        routes=[
            Route("/tokenize", vllm_tokenize, methods=["POST"]),
            Route("/extras/tokenize", tokenize, methods=["POST"]),
            Route("/metrics", metrics),
            Route("/health", lambda _: Response(b"")),
            Route("/v1/models", models),
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/embeddings", completions, methods=["POST"]),
        ]
    )
    return app, st


def _prompt_tokens(body: dict[str, Any]) -> int:
    """A deterministic stand-in for tokenisation: whitespace-separated words."""
    if "messages" in body:
        text = " ".join(str(m.get("content", "")) for m in body["messages"])
    else:
        text = str(body.get("prompt") or body.get("input") or "")
    return max(1, len(text.split()))
