"""The batching engine simulator as an OpenAI-compatible HTTP backend, in real time.

`make_batching_backend(config)` returns an ASGI app and its state. The engine steps on the
event loop, each step taking its modelled duration (scale the cost model's times up: a
Python event loop keeps 20 ms steps better than 3 ms ones). It serves
`POST /v1/chat/completions` (streamed or not; the prompt's size is its characters / 4,
the answer `max_tokens` tokens), `GET /v1/models` (`sim-8b`), vLLM's own gauges at
`GET /metrics` (`vllm:num_requests_running`, `vllm:num_requests_waiting`: it reads as a
vLLM) and the truth at `GET /truth`: each request's Shapley share of the dynamic energy,
by the `x-request-id` it came with.

`SimulatedGpu` is the power source the proxy reads: idle power plus the engine's energy,
each step's spread evenly over it, on the proxy's clock. Run both in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from metering.sources.base import Reading
from tests.support.fakes.batching_engine import Engine, EngineConfig, Event, SimRequest

MODEL = "sim-8b"


@dataclass
class SimState:
    engine: Engine
    t0_s: float
    clock: Callable[[], float] = time.monotonic
    inboxes: dict[str, asyncio.Queue[Event]] = field(default_factory=dict)
    wake: asyncio.Event | None = None
    requests: dict[str, SimRequest] = field(default_factory=dict)

    def now(self) -> float:
        return self.clock() - self.t0_s


class SimulatedGpu:
    """The engine's GPU as a power source: cumulative joules at any instant."""

    method = "trace"
    domain = "gpu"

    def __init__(
        self, state: SimState, name: str = "sim-gpu", gpu_index: int | None = None
    ) -> None:
        self._state = state
        self.name = name
        self.gpu_index = gpu_index  # which `gpus` entry of a backend it is

    def read(self, now_s: float) -> Reading:
        st = self._state
        t = now_s - st.t0_s
        idle_w = st.engine.config.cost.idle_w
        energy = idle_w * t + st.engine.dynamic_j_at(t)
        steps = st.engine.steps
        power = idle_w + (
            steps[-1].energy_j / (steps[-1].end_s - steps[-1].start_s)
            if steps and steps[-1].end_s > t
            else 0.0
        )
        return Reading(energy_j=energy, power_w=power, t_s=now_s)

    def close(self) -> None:
        return None


async def _run_engine(st: SimState) -> None:
    assert st.wake is not None
    while True:
        stepped = st.engine.step(st.now())
        if stepped is None:
            st.wake.clear()
            await st.wake.wait()
            continue
        end, events = stepped
        await asyncio.sleep(max(0.0, end - st.now()))
        for ev in events:
            inbox = st.inboxes.get(ev.rid)
            if inbox is not None:
                inbox.put_nowait(ev)


def make_batching_backend(
    config: EngineConfig, *, gauges: bool = True
) -> tuple[Starlette, SimState]:
    """The simulator as an HTTP backend; `gauges=False`: no /metrics (a server that does
    not tell how many it runs and queues, as Ollama)."""
    st = SimState(Engine(config), t0_s=time.monotonic())

    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def metrics(_: Request) -> Response:
        if not gauges:
            return PlainTextResponse("404 page not found", status_code=404)
        e = st.engine
        body = (
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="{MODEL}"}} {len(e.running)}\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="{MODEL}"}} {len(e.queue)}\n'
        )
        return PlainTextResponse(body)

    async def health(_: Request) -> Response:
        return PlainTextResponse("")

    async def truth(_: Request) -> Response:
        return JSONResponse({rid: r.truth_j for rid, r in st.requests.items()})

    async def chat(request: Request) -> Response:
        body = await request.json()
        rid = request.headers.get("x-request-id") or f"sim-{len(st.requests)}"
        chars = sum(len(str(m.get("content", ""))) for m in body.get("messages", []))
        r = SimRequest(rid, "", st.now(), max(1, chars // 4), int(body.get("max_tokens") or 16))
        inbox: asyncio.Queue[Event] = asyncio.Queue()
        st.inboxes[rid] = inbox
        st.requests[rid] = r
        st.engine.add(r)
        assert st.wake is not None
        st.wake.set()

        def chunk(content: str | None) -> bytes:
            delta = {"content": content} if content is not None else {}
            doc = {"id": rid, "object": "chat.completion.chunk", "model": MODEL,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}  # fmt: skip
            return b"data: " + json.dumps(doc).encode() + b"\n\n"

        usage = {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.max_tokens,
                 "total_tokens": r.prompt_tokens + r.max_tokens}  # fmt: skip
        if not body.get("stream"):
            while (await inbox.get()).kind != "end":
                pass
            st.inboxes.pop(rid, None)
            message = {"role": "assistant", "content": "x" * r.max_tokens}
            choice = {"index": 0, "finish_reason": "length", "message": message}
            return JSONResponse({"id": rid, "object": "chat.completion", "model": MODEL,
                                 "choices": [choice], "usage": usage})  # fmt: skip

        async def events() -> AsyncIterator[bytes]:
            try:
                while True:
                    ev = await inbox.get()
                    if ev.kind in ("first_token", "token"):
                        yield chunk("x")
                    if ev.kind == "end":
                        break
                if (body.get("stream_options") or {}).get("include_usage"):
                    doc = {"id": rid, "object": "chat.completion.chunk", "model": MODEL,
                           "choices": [], "usage": usage}  # fmt: skip
                    yield b"data: " + json.dumps(doc).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
            finally:
                st.inboxes.pop(rid, None)

        return StreamingResponse(events(), media_type="text/event-stream")

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        st.wake = asyncio.Event()
        task = asyncio.create_task(_run_engine(st))
        try:
            yield
        finally:
            task.cancel()

    app = Starlette(
        routes=[
            Route("/v1/models", models),
            Route("/metrics", metrics),
            Route("/health", health),
            Route("/truth", truth),
            Route("/v1/chat/completions", chat, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    return app, st


def scaled(config: EngineConfig, factor: float) -> EngineConfig:
    """The same engine with every step `factor` times as long (energy unchanged)."""
    from dataclasses import replace

    c = config.cost
    cost = replace(
        c,
        fixed_s=c.fixed_s * factor,
        prefill_s_per_token=c.prefill_s_per_token * factor,
        decode_s_per_seq=c.decode_s_per_seq * factor,
    )
    return replace(config, cost=cost)
