"""Routing by energy and carbon against `first` and `least-loaded`, at the same load, in
real time through the whole HTTP stack.

    python -m bench.routing [--rate 6] [--duration 30] [--warmup 45] [--factor 1.5]

Two stand-in GPU backends serve one model (the batching engine simulator over HTTP, read
as a vLLM with its gauges; tests/support/routing.py), each on its own simulated GPU: "old"
draws `--factor` times the energy of "new" for the same work, and they sit in different
grids (old: a low-carbon zone at 50 gCO2eq/kWh, new: 350), so the cheapest in joules is not
the cheapest in carbon. "old" is configured first (the host that was there before).

The proxy first runs `--warmup` seconds under `least-loaded` (each backend's cost model is
fitted from its own traffic), then each policy in turn for `--duration` seconds on the same
Poisson arrivals (streamed chat turns: 100 prompt tokens, 64 output tokens). For each: where
the requests went, the energy both GPUs drew (dynamic, and with their idle draw), joules and
gCO2eq per output token, latency p50/p99; and, at the end, each backend's marginal gauge
against the mean dynamic joules per token its requests were told. Nothing asserts here;
tests/proxy/relay/test_routing_e2e.py checks the choices.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from proxy.relay.router import Router
from tests.support.fakes.batching_backend import scaled
from tests.support.fakes.batching_engine import EngineConfig
from tests.support.routing import MODEL, Fleet, Site, costlier

STEP_SCALE = 5.0  # a Python event loop keeps 17 ms steps better than 3.4 ms ones
PROMPT_CHARS, OUTPUT_TOKENS = 400, 64
POLICIES = ("first", "least-loaded", "energy", "carbon")
INTENSITY = {"old": 50.0, "new": 350.0}


@dataclass
class Tally:
    latencies_s: list[float] = field(default_factory=list)
    backends: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    tokens: int = 0
    failed: int = 0
    told: dict[str, list[float]] = field(default_factory=dict)  # backend -> J/token told


async def one(client: httpx.AsyncClient, url: str, tally: Tally) -> None:
    body = {
        "model": MODEL, "stream": True, "max_tokens": OUTPUT_TOKENS,
        "messages": [{"role": "user", "content": "x" * PROMPT_CHARS}],
    }  # fmt: skip
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
            route = dict(
                p.strip().split("=", 1) for p in resp.headers["x-energy-route"].split(";")
            )
            energy = None
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    energy = json.loads(line[6:]).get("energy", energy)
    except httpx.HTTPError:
        tally.failed += 1
        return
    tally.latencies_s.append(time.perf_counter() - t0)
    tally.backends[route["backend"]] += 1
    tally.reasons[route["reason"]] += 1
    if energy is not None and energy["completion_tokens"]:
        tally.tokens += int(energy["completion_tokens"])
        per_token = energy["dynamic_joules"] / energy["completion_tokens"]
        tally.told.setdefault(route["backend"], []).append(per_token)


async def drive(url: str, rate: float, duration_s: float, seed: int) -> Tally:
    """Poisson arrivals at `rate` a second for `duration_s`, each request in its own task."""
    rng = random.Random(seed)
    tally = Tally()
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=120.0, limits=limits) as client:
        tasks, t = [], 0.0
        start = time.perf_counter()
        while t < duration_s:
            await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
            tasks.append(asyncio.create_task(one(client, url, tally)))
            t += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    return tally


def drawn(fleet: Fleet) -> dict[str, tuple[float, float]]:
    """Each backend's GPU energy so far: (above idle, with idle)."""
    out = {}
    for name, st in fleet.states.items():
        t = st.now()
        dyn = st.engine.dynamic_j_at(t)
        out[name] = (dyn, dyn + st.engine.config.cost.idle_w * t)
    return out


def decision_cost(n: int = 20_000) -> None:
    """CPU microseconds one routing decision takes, by policy, among three backends."""
    from backends.backend import Backend, BackendConfig
    from metering.carbon.intensity import StaticIntensity
    from metering.meter import Meter, Plan
    from metering.sources.constant import ConstantSource

    backends = [Backend(BackendConfig(f"b{i}", f"http://127.0.0.1:{9000 + i}")) for i in range(3)]
    for b in backends:
        b.state.ready = True
    plans = [Plan(b.name) for b in backends]
    source = ConstantSource(100.0, start_s=time.monotonic())
    meter = Meter.build([source], plans, StaticIntensity(100))
    costs = []
    for policy in POLICIES:
        router = Router(meter, policy=policy)
        t0 = time.process_time()
        for _ in range(n):
            router.pick(backends, MODEL, 100.0, 64.0)
        costs.append(f"{policy} {(time.process_time() - t0) / n * 1e6:.1f}")
    one = Router(meter)
    t0 = time.process_time()
    for _ in range(n):
        one.pick(backends[:1], MODEL, 100.0, 64.0)
    costs.append(f"one backend {(time.process_time() - t0) / n * 1e6:.1f}")
    print("a routing decision among three backends, CPU µs: " + ", ".join(costs))


def agree(router: Router, policy: str, tally: Tally) -> list[str]:
    """Each busy backend's estimate against what its requests in the phase were told."""
    out = []
    for name, told in sorted(tally.told.items()):
        if len(told) < 20:
            continue
        mean = statistics.fmean(told)
        est = router.estimate(name, PROMPT_CHARS // 4, OUTPUT_TOKENS).energy
        (low, high), mid = est.band_per_token(), est.j_per_token
        inside = "inside" if low <= mean <= high else "OUTSIDE"
        out.append(
            f"{policy:<13}{name}: estimate {mid:.3f} [{low:.3f}, {high:.3f}], told {mean:.3f} "
            f"over {len(told)}: {inside} (batch {router.batch_of(name):.1f})"
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=6.0, help="requests a second")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per policy")
    ap.add_argument("--warmup", type=float, default=45.0)
    ap.add_argument("--factor", type=float, default=1.5, help="old's energy over new's")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--decision-only", action="store_true", help="only the decision's cost")
    args = ap.parse_args()
    decision_cost()
    if args.decision_only:
        return 0
    base = scaled(EngineConfig(max_running=16), STEP_SCALE)
    sites = [
        Site("old", costlier(base, args.factor), intensity=INTENSITY["old"]),
        Site("new", base, intensity=INTENSITY["new"]),
    ]
    print(
        f"two backends, old = {args.factor:g} x new's energy per step; grid old "
        f"{INTENSITY['old']:g}, new {INTENSITY['new']:g} gCO2eq/kWh; {args.rate:g} req/s "
        f"(streamed, {PROMPT_CHARS // 4} prompt + {OUTPUT_TOKENS} output tokens), "
        f"{args.duration:g} s per policy after {args.warmup:g} s of least-loaded"
    )
    with tempfile.TemporaryDirectory() as tmp, Fleet(Path(tmp), sites, route="least-loaded") as f:
        assert f.app is not None
        router = f.app.ctx.router
        asyncio.run(drive(f.proxy_url, args.rate, args.warmup, seed=0))
        header = (
            f"{'policy':<14}{'old/new':>9}{'dyn kJ':>8}{'all kJ':>8}{'J/tok':>7}"
            f"{'mgCO2/tok':>10}{'p50 s':>7}{'p99 s':>7}{'failed':>7}  reasons"
        )
        print(header)
        agreement: list[str] = []
        for i, policy in enumerate(args.policies.split(",")):
            router.policy = policy
            before = drawn(f)
            tally = asyncio.run(drive(f.proxy_url, args.rate, args.duration, seed=1 + i))
            after = drawn(f)
            dyn = {n: after[n][0] - before[n][0] for n in after}
            tot = {n: after[n][1] - before[n][1] for n in after}
            grams = sum(tot[n] * INTENSITY[n] / 3.6e6 for n in tot)
            lat = sorted(tally.latencies_s)
            p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan")
            print(
                f"{policy:<14}{tally.backends['old']:>4}/{tally.backends['new']:<4}"
                f"{sum(dyn.values()) / 1e3:>8.2f}{sum(tot.values()) / 1e3:>8.2f}"
                f"{sum(tot.values()) / max(1, tally.tokens):>7.2f}"
                f"{grams * 1e3 / max(1, tally.tokens):>10.3f}"
                f"{statistics.median(lat) if lat else float('nan'):>7.2f}{p99:>7.2f}"
                f"{tally.failed:>7}  {dict(tally.reasons)}"
            )
            agreement.extend(agree(router, policy, tally))
        print(
            "marginal estimate for this shape at each phase's end (J per output token, 90 % "
            "band) against the mean its requests were told, where a backend served >= 20:"
        )
        for line in agreement:
            print("  " + line)
        models = f.app.ctx.meter.cost_models()
        for name in ("old", "new"):
            m = models[name]
            print(
                f"  {name}'s cost model: {m['in_use']} over {m['intervals']} intervals, fixed "
                f"{m['fixed_w']:.0f} W, prefill {float(m['prefill_j_per_token']) * 1e3:.2f} mJ, "
                f"decode {float(m['decode_j_per_token']) * 1e3:.2f} mJ a token; capacity "
                f"{m['queue_capacity']} ({m['queue_capacity_source']})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
