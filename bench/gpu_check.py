"""On a GPU host: what the proxy adds to time to first token, what its sampler costs, and
whether its joules add up to each GPU's own counter. One table.

    python -m bench.gpu_check --backend http://127.0.0.1:8000 [--gpus 0] [--streams 15]
                              [--concurrent 48] [--max-tokens 64] [--idle-s 10]

Starts `energy-proxy serve --backend URL --power-source nvml[:GPUS]` on a free port, then:

1. time to first token: `--streams` short streams one after another, alternating direct to
   the backend and through the proxy; p50 and p99 of each and the difference;
2. sampler CPU: the proxy process's CPU (all threads) over `--idle-s` seconds with nothing
   in flight, as % of one core (that is the sensor threads and the loop's tick);
3. conservation: `--concurrent` streams at once through the proxy; per GPU, the growth of
   the proxy's `energy_proxy_energy_joules_total` (attributed + idle) against the growth of
   the GPU's energy counter read here, independently, through NVML over the same window,
   and the sum of the joules the requests were told against the attributed total.

Needs the project's dependencies and nvidia-ml-py; the backend is any OpenAI-compatible
server (a batching GPU simulator needing only torch and aiohttp will do). Without a GPU
it runs against the fake NVML library the tests use (LD_LIBRARY_PATH and
FAKE_NVML_SCRIPT), which is how its own test runs it. Nothing is asserted; the exit code is
1 when conservation misses by more than one counter step's worth of energy, or a request
failed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from backends.local.launch import proxy_server
from metering.sources.nvml import NvmlSession


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def stream_lines(base_url: str, model: str, max_tokens: int, prompt: str) -> Iterator[str]:
    """The SSE lines of one streamed chat request, as they arrive."""
    body = {
        "model": model,
        "stream": True,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": prompt}],
    }
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        yield from r.iter_lines()


def first_token_s(base_url: str, model: str, max_tokens: int) -> float:
    """Seconds from sending a streamed chat request to its first content chunk."""
    t0 = time.perf_counter()
    first = None
    for line in stream_lines(base_url, model, max_tokens, "Count from one to twenty."):
        chunk = line.replace(" ", "")
        if first is None and chunk.startswith("data:{") and '"choices":[{' in chunk:
            first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("the stream carried no token")
    return first


def stream_joules(base_url: str, model: str, max_tokens: int) -> float:
    """The joules the proxy told a streamed request, from its final energy event."""
    energy = None
    for line in stream_lines(base_url, model, max_tokens, "Write a short poem about the sea."):
        if line.startswith("data: {") and '"energy"' in line:
            energy = json.loads(line[6:])["energy"]
    if energy is None:
        raise RuntimeError("no energy event in the stream")
    return float(energy["joules"])


def proxy_gpu_joules(proxy_url: str) -> dict[tuple[str, str], float]:
    """(nvml source, scope) -> joules, as of this scrape (the proxy reads its sources first)."""
    out: dict[tuple[str, str], float] = {}
    text = httpx.get(f"{proxy_url}/metrics", timeout=30).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            src = s.labels.get("source", "")
            if s.name == "energy_proxy_energy_joules_total" and src.startswith("nvml:"):
                out[(src, s.labels["scope"])] = s.value
    return out


def board_joules(session: NvmlSession, indices: list[int]) -> dict[str, float]:
    return {
        f"nvml:{i}": session.total_energy_mj(session.device_handle(i)) / 1000.0 for i in indices
    }


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(fn: Callable[[], float], errors: list[str]) -> float | None:
    try:
        return fn()
    except (httpx.HTTPError, RuntimeError, ValueError, KeyError) as exc:
        errors.append(str(exc))
        return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--backend", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--gpus", default="", help="NVML indices, e.g. 0,1 (default: all)")
    p.add_argument("--streams", type=int, default=15)
    p.add_argument("--concurrent", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--idle-s", type=float, default=10.0)
    p.add_argument("--settle-s", type=float, default=5.0, help="before measuring (learning)")
    args = p.parse_args()
    backend = args.backend.rstrip("/").removesuffix("/v1")
    model = args.model or httpx.get(f"{backend}/v1/models", timeout=30).json()["data"][0]["id"]
    spec = "nvml" + (f":{args.gpus}" if args.gpus else "")
    errors: list[str] = []
    session = NvmlSession()
    with ExitStack() as stack:
        stack.enter_context(session)
        db = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "requests.db"
        count = session.device_count()
        indices = [int(i) for i in args.gpus.split(",")] if args.gpus else list(range(count))
        names = {i: session.device_name(session.device_handle(i)) for i in indices}
        server = stack.enter_context(
            proxy_server(
                backend,
                extra_args=["--power-source", spec, "--idle-watts", "auto", "--db", str(db)],
            )
        )
        proxy = server.url
        assert server.proc is not None
        time.sleep(args.settle_s)

        # 1. time to first token, alternating direct and proxied
        direct: list[float] = []
        proxied: list[float] = []
        for _ in range(args.streams):
            for url, into in ((backend, direct), (proxy, proxied)):
                t = timed(functools.partial(first_token_s, url, model, 8), errors)
                if t is not None:
                    into.append(t)

        # 2. sampler CPU with nothing in flight
        time.sleep(1.0)
        c0, w0 = process_cpu_s(server.proc.pid), time.monotonic()
        time.sleep(args.idle_s)
        idle_cpu = 100.0 * (process_cpu_s(server.proc.pid) - c0) / (time.monotonic() - w0)

        # 3. conservation over a window of concurrent streams
        proxy0, board0, t0 = (
            proxy_gpu_joules(proxy),
            board_joules(session, indices),
            time.monotonic(),
        )
        lock = threading.Lock()
        told: list[float] = []

        def one(_: int) -> None:
            j = timed(lambda: stream_joules(proxy, model, args.max_tokens), errors)
            if j is not None:
                with lock:
                    told.append(j)

        with ThreadPoolExecutor(args.concurrent) as pool:
            list(pool.map(one, range(args.concurrent)))
        time.sleep(1.0)  # quiet, so the counters have moved past the last request
        proxy1, board1 = proxy_gpu_joules(proxy), board_joules(session, indices)
        window_s = time.monotonic() - t0

    def grew(src: str, scope: str) -> float:
        return proxy1.get((src, scope), 0.0) - proxy0.get((src, scope), 0.0)

    gpu_list = ", ".join(f"{i}: {n}" for i, n in names.items())
    print(f"energy-proxy GPU check: {backend} ({model}); GPUs {gpu_list}")
    row = "{:<46} {:>28}"
    if direct and proxied:
        d50, p50 = statistics.median(direct), statistics.median(proxied)
        for label, xs in (("direct", direct), ("through the proxy", proxied)):
            value = f"{statistics.median(xs) * 1e3:.2f} / {percentile(xs, 0.99) * 1e3:.2f} ms"
            print(row.format(f"time to first token {label}, p50 / p99", value))
        print(row.format("added by the proxy, p50", f"{(p50 - d50) * 1e3:+.2f} ms"))
    print(row.format("proxy CPU, nothing in flight", f"{idle_cpu:.2f} % of a core"))
    ok = not errors
    attributed = 0.0
    for src in sorted(board1):
        proxy_j = grew(src, "attributed") + grew(src, "idle")
        attributed += grew(src, "attributed")
        board_j = board1[src] - board0[src]
        # The board counter moves in steps (100 ms on an H100): one step at each end of the
        # window, at the window's mean power.
        tolerance_j = 0.2 * board_j / window_s + 1.0
        good = abs(proxy_j - board_j) <= tolerance_j
        ok &= good
        verdict = "ok" if good else "MISS"
        value = f"{proxy_j:.1f} / {board_j:.1f} J {verdict}"
        print(row.format(f"{src}: attributed+idle / board counter", value))
    print(row.format("sum told to requests / attributed", f"{sum(told):.1f} / {attributed:.1f} J"))
    print(row.format("requests that failed", str(len(errors))))
    for e in errors[:5]:
        print(f"  {e}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
