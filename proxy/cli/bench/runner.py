"""Send a prompt set through the proxy and measure each request from its own energy answer.

Every request is streamed (`"stream": true`): the stream gives time to first token and
time per output token, and its last event before `[DONE]` is the proxy's `energy` object.
Per model, in order: a pause so the hardware cools (not before the first), an idle
baseline (the proxy's `energy_proxy_power_watts` with nothing of ours in flight), warm-up
requests that are not counted, then every prompt `repetitions` times at the given client
concurrency. A failed request is a result with `status="error"`, never dropped.

No files and no terminal here: results go to `Hooks.on_result` as they finish and come
back in a `BenchRun`; `proxy.cli.bench.command` writes and displays them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from prometheus_client.parser import text_string_to_metric_families

from proxy.cli.bench.results import STATUS_ERROR, STATUS_OK, RequestResult


class PromptLike(Protocol):
    """What the runner needs of a prompt (`proxy.cli.bench.prompt_set.BenchPrompt` has it)."""

    @property
    def id(self) -> str: ...
    @property
    def category(self) -> str: ...
    @property
    def messages(self) -> Sequence[Mapping[str, Any]]: ...
    @property
    def max_tokens(self) -> int | None: ...
    @property
    def temperature(self) -> float | None: ...
    @property
    def seed(self) -> int | None: ...


@dataclass(frozen=True)
class RunOptions:
    repetitions: int = 3
    warmup: int = 1  # requests per model before measuring, not counted
    concurrency: int = 1  # requests in flight from this client at once
    idle_s: float = 10.0  # idle baseline per model (0: none)
    idle_sample_every_s: float = 0.5
    pause_s: float = 10.0  # before each model but the first, so the hardware cools
    max_tokens: int | None = None  # overrides every prompt's own
    timeout_s: float = 600.0  # per request, without a byte from the proxy
    api_key: str | None = None  # sent as a bearer token when the proxy wants one

    def __post_init__(self) -> None:
        if self.repetitions < 1 or self.concurrency < 1 or self.warmup < 0:
            raise ValueError("repetitions and concurrency must be >= 1, warmup >= 0")
        if self.idle_s < 0 or self.pause_s < 0 or self.idle_sample_every_s <= 0:
            raise ValueError("idle_s and pause_s must be >= 0, idle_sample_every_s > 0")


@dataclass(frozen=True)
class Job:
    model: str
    prompt: PromptLike
    repetition: int
    warmup: bool = False


@dataclass(frozen=True)
class Phase:
    """Where the run is, for a progress display. `total` requests in this phase."""

    model: str
    name: str  # "pause", "idle", "warmup", "measure"
    total: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class IdleBaseline:
    mean_watts: float | None  # all sources summed; None if /metrics gave no reading
    samples: int
    max_inflight: float  # the proxy's in-flight count seen meanwhile (0: truly idle)


@dataclass(frozen=True)
class ModelRun:
    """One model's pass: its idle baseline, its warm-up, and the measured phase."""

    model: str
    idle_watts: float | None
    idle_samples: int
    idle_max_inflight: float
    warmup_requests: int
    warmup_failures: int
    requests: int
    failures: int
    wall_s: float  # the measured phase, first request sent to last answer
    completion_tokens: int
    throughput_tokens_per_s: float | None  # completion tokens / wall_s, all requests

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Hooks:
    on_result: Callable[[RequestResult], None] | None = None  # each measured request
    on_warmup: Callable[[RequestResult], None] | None = None  # each warm-up request
    on_phase: Callable[[Phase], None] | None = None
    on_model: Callable[[ModelRun], None] | None = None  # each model's pass, when done
    request_headers: Callable[[Job], Mapping[str, str]] | None = None  # extra headers


@dataclass
class BenchRun:
    results: list[RequestResult] = field(default_factory=list)
    models: list[ModelRun] = field(default_factory=list)


Sleep = Callable[[float], Awaitable[None]]


async def list_models(client: httpx.AsyncClient, proxy_url: str) -> list[str]:
    """The models the proxy lists (`GET /v1/models`), in its order."""
    r = await client.get(f"{proxy_url}/v1/models")
    r.raise_for_status()
    return [str(m["id"]) for m in r.json().get("data", [])]


async def run_bench(
    proxy_url: str,
    models: Sequence[str],
    prompts: Sequence[PromptLike],
    options: RunOptions | None = None,
    hooks: Hooks | None = None,
    *,
    client: httpx.AsyncClient | None = None,
    sleep: Sleep = asyncio.sleep,
    clock: Callable[[], float] = time.perf_counter,
    wall_clock: Callable[[], float] = time.time,
) -> BenchRun:
    """Benchmark `models` on `prompts` through the proxy at `proxy_url`.

    Returns every measured request (also handed to `hooks.on_result` as it finishes, so a
    caller that is interrupted keeps what was done) and one `ModelRun` per model.
    """
    opts = options or RunOptions()
    hk = hooks or Hooks()
    run = BenchRun()
    proxy_url = proxy_url.rstrip("/")
    own = client is None
    http = client or make_client(opts)
    try:
        for i, model in enumerate(models):
            if i and opts.pause_s > 0:
                _phase(hk, Phase(model, "pause", seconds=opts.pause_s))
                await sleep(opts.pause_s)
            model_run = await _run_model(
                http, proxy_url, model, prompts, opts, hk, run, sleep, clock, wall_clock
            )
            run.models.append(model_run)
            if hk.on_model is not None:
                hk.on_model(model_run)
    finally:
        if own:
            await http.aclose()
    return run


async def _run_model(
    http: httpx.AsyncClient,
    proxy_url: str,
    model: str,
    prompts: Sequence[PromptLike],
    opts: RunOptions,
    hk: Hooks,
    run: BenchRun,
    sleep: Sleep,
    clock: Callable[[], float],
    wall_clock: Callable[[], float],
) -> ModelRun:
    """One model: idle baseline, warm-up, then every prompt `repetitions` times."""
    idle = IdleBaseline(None, 0, 0.0)
    if opts.idle_s > 0:
        _phase(hk, Phase(model, "idle", seconds=opts.idle_s))
        idle = await measure_idle(
            http, proxy_url, opts.idle_s, opts.idle_sample_every_s, sleep=sleep, clock=clock
        )
    warm = [
        Job(model, prompts[k % len(prompts)], 0, warmup=True)
        for k in range(opts.warmup if prompts else 0)
    ]
    _phase(hk, Phase(model, "warmup", total=len(warm)))
    warm_results = await run_jobs(
        http, proxy_url, warm, opts, hk.on_warmup, hk.request_headers, clock, wall_clock
    )
    jobs = [Job(model, p, rep) for rep in range(opts.repetitions) for p in prompts]
    _phase(hk, Phase(model, "measure", total=len(jobs)))
    results: list[RequestResult] = []

    def keep(r: RequestResult) -> None:
        results.append(r)
        run.results.append(r)
        if hk.on_result is not None:
            hk.on_result(r)

    t0 = clock()
    await run_jobs(http, proxy_url, jobs, opts, keep, hk.request_headers, clock, wall_clock)
    wall_s = clock() - t0
    tokens = sum(r.completion_tokens or 0 for r in results if r.ok)
    return ModelRun(
        model=model,
        idle_watts=idle.mean_watts,
        idle_samples=idle.samples,
        idle_max_inflight=idle.max_inflight,
        warmup_requests=len(warm_results),
        warmup_failures=sum(not r.ok for r in warm_results),
        requests=len(results),
        failures=sum(not r.ok for r in results),
        wall_s=wall_s,
        completion_tokens=tokens,
        throughput_tokens_per_s=tokens / wall_s if wall_s > 0 else None,
    )


def make_client(opts: RunOptions) -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    return httpx.AsyncClient(
        timeout=httpx.Timeout(opts.timeout_s, connect=10.0),
        limits=httpx.Limits(max_connections=opts.concurrency + 2),
        headers=headers,
    )


def _phase(hk: Hooks, phase: Phase) -> None:
    if hk.on_phase is not None:
        hk.on_phase(phase)


async def run_jobs(
    client: httpx.AsyncClient,
    proxy_url: str,
    jobs: Sequence[Job],
    opts: RunOptions,
    on_result: Callable[[RequestResult], None] | None = None,
    request_headers: Callable[[Job], Mapping[str, str]] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    wall_clock: Callable[[], float] = time.time,
) -> list[RequestResult]:
    """Send `jobs` with at most `opts.concurrency` in flight; results in finishing order."""
    queue: asyncio.Queue[Job] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    done: list[RequestResult] = []

    async def worker() -> None:
        while True:
            try:
                job = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            extra = request_headers(job) if request_headers is not None else {}
            result = await send_one(
                client, proxy_url, job, opts, extra, clock=clock, wall_clock=wall_clock
            )
            done.append(result)
            if on_result is not None:
                on_result(result)

    async with asyncio.TaskGroup() as tg:
        for _ in range(min(opts.concurrency, len(jobs))):
            tg.create_task(worker())
    return done


def request_body(job: Job, opts: RunOptions) -> dict[str, Any]:
    p = job.prompt
    body: dict[str, Any] = {
        "model": job.model,
        "messages": [dict(m) for m in p.messages],
        "stream": True,
    }
    max_tokens = opts.max_tokens if opts.max_tokens is not None else p.max_tokens
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if p.temperature is not None:
        body["temperature"] = p.temperature
    if p.seed is not None:
        body["seed"] = p.seed
    return body


async def send_one(
    client: httpx.AsyncClient,
    proxy_url: str,
    job: Job,
    opts: RunOptions,
    extra_headers: Mapping[str, str] | None = None,
    *,
    clock: Callable[[], float] = time.perf_counter,
    wall_clock: Callable[[], float] = time.time,
) -> RequestResult:
    """One streamed request; any failure (status, broken stream, no energy) is a result."""
    # A UUID: llama-cpp-python's server answers a bare 400 to any other x-request-id.
    request_id = str(uuid.uuid4())
    headers = {
        "x-prompt-category": job.prompt.category,
        "x-request-id": request_id,
        **(extra_headers or {}),
    }
    base: dict[str, Any] = {
        "model": job.model,
        "category": job.prompt.category,
        "prompt_id": job.prompt.id,
        "repetition": job.repetition,
        "request_id": request_id,
        "concurrency": opts.concurrency,
        "started_unix_s": wall_clock(),
    }
    stream = _StreamState()
    status: int | None = None
    t0 = clock()
    try:
        async with client.stream(
            "POST",
            f"{proxy_url}/v1/chat/completions",
            json=request_body(job, opts),
            headers=headers,
        ) as resp:
            status = resp.status_code
            if status != 200:
                body = await resp.aread()
                return RequestResult(
                    **base,
                    status=STATUS_ERROR,
                    http_status=status,
                    error=f"HTTP {status}: {_error_message(body)}",
                    duration_s=clock() - t0,
                )
            async for line in resp.aiter_lines():
                stream.feed(line, clock() - t0)
    except httpx.HTTPError as exc:
        stream.error = stream.error or f"{type(exc).__name__}: {exc}".rstrip(": ")
    except ValueError as exc:  # an event that is not JSON
        stream.error = stream.error or f"bad event from the proxy: {exc}"
    duration_s = clock() - t0
    return stream.result(base, status, duration_s)


@dataclass
class _StreamState:
    """What the SSE events of one answer said, fed line by line with arrival times."""

    text: list[str] = field(default_factory=list)
    chunks_with_text: int = 0
    first_s: float | None = None
    last_s: float | None = None
    energy: dict[str, Any] | None = None
    error: str = ""
    done: bool = False

    def feed(self, line: str, at_s: float) -> None:
        if not line.startswith("data:"):
            return
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return
        event = json.loads(data)
        if not isinstance(event, dict):
            return
        if isinstance(event.get("error"), dict):
            self.error = f"stream error: {event['error'].get('message', event['error'])}"
        if isinstance(event.get("energy"), dict):
            self.energy = event["energy"]
        for choice in event.get("choices") or ():
            piece = _choice_text(choice)
            if piece:
                self.text.append(piece)
                self.chunks_with_text += 1
                if self.first_s is None:
                    self.first_s = at_s
                self.last_s = at_s

    def result(
        self, base: Mapping[str, Any], http_status: int | None, duration_s: float
    ) -> RequestResult:
        e = self.energy or {}
        error = self.error
        if not error and not self.done:
            error = "the stream ended without [DONE]"
        if not error and not e:
            error = "no energy event in the stream"
        completion = _int_or_none(e.get("completion_tokens"))
        n_tokens = completion if completion is not None else self.chunks_with_text
        tpot_s = None
        if self.first_s is not None and self.last_s is not None and n_tokens > 1:
            tpot_s = (self.last_s - self.first_s) / (n_tokens - 1)
        text = "".join(self.text)
        return RequestResult(
            **base,
            status=STATUS_ERROR if error else STATUS_OK,
            error=error,
            http_status=http_status,
            joules=_float_or_none(e.get("joules")),
            dynamic_joules=_float_or_none(e.get("dynamic_joules")),
            prompt_tokens=_int_or_none(e.get("prompt_tokens")),
            completion_tokens=completion,
            duration_s=duration_s,
            ttft_s=self.first_s,
            tpot_s=tpot_s,
            co2eq_g=_float_or_none(e.get("co2eq_g")),
            method=str(e.get("method") or ""),
            output_sha256=hashlib.sha256(text.encode()).hexdigest() if self.first_s else "",
        )


def _choice_text(choice: Any) -> str:
    if not isinstance(choice, dict):
        return ""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        content = delta.get("content")
        return content if isinstance(content, str) else ""
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def _float_or_none(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _int_or_none(x: Any) -> int | None:
    return int(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _error_message(body: bytes) -> str:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        doc = json.loads(body)
        msg = doc["error"]["message"] if isinstance(doc.get("error"), dict) else doc["error"]
        return str(msg)[:500]
    return body.decode(errors="replace")[:500] or "(empty body)"


async def read_power(client: httpx.AsyncClient, proxy_url: str) -> tuple[float | None, float]:
    """(watts, all sources summed, or None without a reading; requests in flight)."""
    r = await client.get(f"{proxy_url}/metrics")
    r.raise_for_status()
    watts: float | None = None
    inflight = 0.0
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            if s.name == "energy_proxy_power_watts":
                watts = (watts or 0.0) + s.value
            elif s.name == "energy_proxy_inflight_requests":
                inflight += s.value
    return watts, inflight


async def measure_idle(
    client: httpx.AsyncClient,
    proxy_url: str,
    seconds: float,
    every_s: float = 0.5,
    *,
    sleep: Sleep = asyncio.sleep,
    clock: Callable[[], float] = time.perf_counter,
) -> IdleBaseline:
    """Mean power over `seconds` with nothing of ours in flight, read every `every_s`."""
    readings: list[float] = []
    max_inflight = 0.0
    start = clock()
    while True:
        try:
            watts, inflight = await read_power(client, proxy_url)
        except (httpx.HTTPError, ValueError):  # one lost reading is no reason to stop
            watts, inflight = None, 0.0
        if watts is not None:
            readings.append(watts)
        max_inflight = max(max_inflight, inflight)
        left = seconds - (clock() - start)
        if left <= 0:
            break
        await sleep(min(every_s, left))
    mean_w = sum(readings) / len(readings) if readings else None
    return IdleBaseline(mean_w, len(readings), max_inflight)
