"""The load generators of bench/overhead.py: wrk (a Lua POST script per body), or a
Python fallback on aiohttp when wrk is missing (which saturates a core by itself at c=64,
so its ratios look better than they are; overhead.py says so when it uses it)."""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

BODY_PLAIN = '{"model":"fake-model","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
BODY_STREAM = BODY_PLAIN[:-1] + ',"stream":true}'


# ---------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Result:
    """One load run: latency percentiles in ms, throughput, and failed requests."""

    p50_ms: float
    p99_ms: float
    rps: float
    requests: int
    errors: int


def aggregate(runs: Sequence[Result], how: str) -> Result:
    """Best (lowest latency, highest req/s, independently) or median of several runs."""
    pick_low: Callable[[list[float]], float] = min if how == "best" else statistics.median
    pick_high: Callable[[list[float]], float] = max if how == "best" else statistics.median
    return Result(
        p50_ms=pick_low([r.p50_ms for r in runs]),
        p99_ms=pick_low([r.p99_ms for r in runs]),
        rps=pick_high([r.rps for r in runs]),
        requests=sum(r.requests for r in runs),
        errors=sum(r.errors for r in runs),
    )


# ---------------------------------------------------------------------------- wrk

_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_PCT_RE = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_RPS_RE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_REQS_RE = re.compile(r"^\s*(\d+) requests in", re.M)
_NON2XX_RE = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKERR_RE = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def parse_wrk(text: str) -> Result:
    """Parse `wrk --latency` output. Units vary per line (us, ms, s), so convert each."""
    pct = {m[1]: float(m[2]) * _UNIT_MS[m[3]] for m in _PCT_RE.finditer(text)}
    rps = _RPS_RE.search(text)
    if rps is None or "50" not in pct or "99" not in pct:
        raise ValueError(f"cannot parse wrk output:\n{text}")
    reqs = _REQS_RE.search(text)
    non2xx = _NON2XX_RE.search(text)
    sock = _SOCKERR_RE.search(text)
    errors = (int(non2xx[1]) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)
    return Result(pct["50"], pct["99"], float(rps[1]), int(reqs[1]) if reqs else 0, errors)


def write_lua(directory: Path, name: str, body: str) -> Path:
    """wrk sends GET without a script; this makes every request our JSON POST."""
    path = directory / f"{name}.lua"
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = [[{body}]]\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return path


@dataclass(frozen=True)
class WrkLoad:
    wrk: str
    scripts: dict[bool, Path]  # stream? -> Lua script

    name = "wrk"

    def run(self, url: str, stream: bool, concurrency: int, duration_s: int) -> Result:
        # One wrk thread per core at most; c=1 needs exactly one.
        threads = 1 if concurrency == 1 else 2
        cmd = [
            self.wrk,
            "-t",
            str(threads),
            "-c",
            str(concurrency),
            "-d",
            f"{duration_s}s",
            "--timeout",
            "10s",
            "--latency",
            "-s",
            str(self.scripts[stream]),
            url,
        ]
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=duration_s + 60, check=False
        )
        if out.returncode != 0:
            raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr or out.stdout}")
        return parse_wrk(out.stdout)


# ---------------------------------------------------------------------------- python fallback


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


@dataclass(frozen=True)
class PythonLoad:
    """aiohttp closed-loop load: `concurrency` workers, each one request at a time.

    Much slower than wrk: at c=64 it saturates a core by itself, which caps both sides and
    makes the ratio look better than it is.
    """

    name = "python-aiohttp (fallback: install wrk for trustworthy numbers)"

    def run(self, url: str, stream: bool, concurrency: int, duration_s: int) -> Result:
        body = (BODY_STREAM if stream else BODY_PLAIN).encode()
        return _new_runner().run(_python_load(url, body, concurrency, duration_s))


async def _python_load(url: str, body: bytes, concurrency: int, duration_s: int) -> Result:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    headers = {"Content-Type": "application/json"}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration_s

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while loop.time() < deadline:
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    ok = resp.status < 400
            except aiohttp.ClientError:
                ok = False
                await asyncio.sleep(0.01)  # do not spin on a dead target
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    start = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    elapsed_s = time.perf_counter() - start
    latencies.sort()
    return Result(
        percentile(latencies, 50) * 1e3,
        percentile(latencies, 99) * 1e3,
        len(latencies) / elapsed_s,
        len(latencies),
        errors,
    )


def _new_runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


LoadGen = WrkLoad | PythonLoad


def pick_loadgen(workdir: Path, force_python: bool) -> LoadGen:
    wrk = None if force_python else shutil.which("wrk")
    if wrk is None:
        if not force_python:
            print(
                "wrk not found: install it (apt-get install -y wrk) for trustworthy numbers;"
                " falling back to a pure-Python aiohttp load generator.",
                file=sys.stderr,
            )
        return PythonLoad()
    scripts = {
        False: write_lua(workdir, "plain", BODY_PLAIN),
        True: write_lua(workdir, "stream", BODY_STREAM),
    }
    return WrkLoad(wrk, scripts)
