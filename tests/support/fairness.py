"""The proxy's attribution against the engine simulator's truth: one scenario, one number.

A scenario is an engine configuration (admission limit, chunked prefill, cost model), a
mix of request kinds and an arrival rate. The engine (batching_engine.py) serves the
requests in virtual time and yields what the proxy would see (start, first token, end);
the proxy's own code (metering.accounting.attribution and .ledger) splits the energy a
perfect counter reports at each of those instants, with the idle draw known. The error is the
mean absolute difference, over the kinds, between each kind's share of the dynamic energy
as the proxy split it and as the Shapley truth has it.

The proxy is assumed to have seen the backend's metrics before (its queue model knows the
capacity, as after its first minutes of traffic); its metrics are also scraped every
`scrape_s` seconds while the scenario runs (vLLM's num_requests_running and _waiting).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from metering.accounting.attribution import Attribution, EngineQueue, Flight
from metering.accounting.ledger import Ledger
from tests.support.fakes.batching_engine import CostModel, Engine, EngineConfig, SimRequest

# kind -> (prompt tokens, tokens generated; 0: embeddings), at ~4 characters a token.
CHAT = (40, 256)  # a short question, a long answer
RAG = (4000, 16)  # 16,000 characters of context, a short answer
MID = (500, 64)  # 2,000 characters, a paragraph back
LONG_GENERATION = (100, 1024)
EMBEDDINGS = (300, 0)

MIXES: dict[str, dict[str, tuple[int, int]]] = {
    "chat+rag+mid": {"chat": CHAT, "rag": RAG, "mid": MID},
    "+embeddings+long": {
        "chat": CHAT,
        "rag": RAG,
        "mid": MID,
        "embed": EMBEDDINGS,
        "long": LONG_GENERATION,
    },
}
ENGINES: dict[str, EngineConfig] = {
    "admits all, whole prompts": EngineConfig(),
    "admits 12, chunks of 2,048": EngineConfig(max_running=12, prefill_chunk=2048),
    "admits 8, chunks of 512": EngineConfig(max_running=8, prefill_chunk=512),
    "admits all, chunks of 2,048": EngineConfig(prefill_chunk=2048),
}
# Arrivals per second (0: all at once). At 4/s nothing waits; at 40/s and at once, the
# admitting engines keep most requests queued.
LOADS: dict[str, float] = {"light (4/s)": 4.0, "busy (40/s)": 40.0, "burst (all at once)": 0.0}


@dataclass(frozen=True, slots=True)
class Outcome:
    error: float  # mean absolute error of the kinds' shares
    shares: dict[str, tuple[float, float]]  # kind -> (proxy's share, truth's share)
    waited: int  # requests that waited in the engine's queue (over 50 ms)


def requests_for(
    mix: dict[str, tuple[int, int]], per_kind: int, rate_per_s: float, seed: int = 1
) -> list[SimRequest]:
    rng = random.Random(seed)
    kinds = [k for k in mix for _ in range(per_kind)]
    rng.shuffle(kinds)
    t = 0.0
    out = []
    for i, kind in enumerate(kinds):
        if rate_per_s:
            t += rng.expovariate(rate_per_s)
        prompt, generated = mix[kind]
        out.append(SimRequest(f"r{i}", kind, t, prompt, generated))
    return out


def run_scenario(
    config: EngineConfig,
    requests: list[SimRequest],
    mode: str,
    *,
    scrape_s: float = 1.0,
    warm: bool = True,
) -> Outcome:
    engine = Engine(config)
    idle_w = config.cost.idle_w
    ledger = Ledger(["gpu"])
    attribution = Attribution(mode)
    queue = EngineQueue()
    if warm and config.max_running is not None:
        queue.learn(config.max_running, 1)  # seen full before
    by_id = {r.rid: r for r in requests}
    flights: dict[str, Flight] = {}
    dynamic: dict[str, float] = {}
    next_scrape_s = scrape_s
    for ev in engine.run(requests):
        t = ev.t_s
        while t >= next_scrape_s:
            if engine.steps:
                last = engine.steps[-1]
                for f, weight in attribution.observe(queue, last.running, last.waiting):
                    ledger.reweigh(f.handle, weight)
            next_scrape_s += scrape_s
        ledger.record("gpu", idle_w * t + engine.dynamic_j_at(t), t, idle_w)
        r = by_id[ev.rid]
        if ev.kind == "start":
            f = flights[r.rid] = Flight(r.prompt_tokens, stream=r.max_tokens > 0,
                                        embeddings=r.max_tokens == 0)  # fmt: skip
            f.handle = ledger.start(attribution.start(f, queue))
        elif ev.kind == "first_token":
            f = flights[r.rid]
            weight = attribution.first_token(f, queue)
            if weight is not None:
                ledger.reweigh(f.handle, weight)
        elif ev.kind == "end":
            f = flights.pop(r.rid)
            (share,) = ledger.finish(f.handle)
            dynamic[r.rid] = share.dynamic_j
            for admitted, weight in attribution.finish(f, queue):
                ledger.reweigh(admitted.handle, weight)
    error, shares = kind_shares(requests, dynamic)
    waited = sum(  # waited for admission longer than the step it arrived in
        1 for r in requests if r.admitted_s is not None and r.admitted_s - r.arrival_s > 0.05
    )
    return Outcome(error, shares, waited)


def kind_shares(
    requests: list[SimRequest], told: dict[str, float]
) -> tuple[float, dict[str, tuple[float, float]]]:
    """Each kind's share of the dynamic energy as the requests were `told` it (request id
    -> joules) and as the truth has it, and the mean absolute difference over the kinds."""
    truth_total = sum(r.truth_j for r in requests)
    told_total = sum(told[r.rid] for r in requests) or 1.0
    shares: dict[str, tuple[float, float]] = {}
    for kind in sorted({r.kind for r in requests}):
        mine = [r for r in requests if r.kind == kind]
        shares[kind] = (
            sum(told[r.rid] for r in mine) / told_total,
            sum(r.truth_j for r in mine) / truth_total,
        )
    return sum(abs(a - b) for a, b in shares.values()) / len(shares), shares


def cost_variants() -> dict[str, CostModel]:
    """The H100-shaped model, and prefill / the step's fixed cost at half and twice it."""
    base = CostModel()
    out = {"H100-shaped": base}
    for name, cp, fixed in (
        ("prefill x0.5", base.prefill_j_per_token / 2, base.fixed_j),
        ("prefill x2", base.prefill_j_per_token * 2, base.fixed_j),
        ("fixed x0.5", base.prefill_j_per_token, base.fixed_j / 2),
        ("fixed x2", base.prefill_j_per_token, base.fixed_j * 2),
    ):
        out[name] = CostModel(prefill_j_per_token=cp, fixed_j=fixed)
    return out
