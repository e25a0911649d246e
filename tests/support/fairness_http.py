"""The fair split through the whole stack, in real time: the real `openai` client, the
proxy on a socket, and the batching engine simulator as a real HTTP backend (it reads as
a vLLM, with its queue gauges or without); the proxy meters the simulator's GPU. Each
kind's share of the dynamic energy, as the requests were told it, against the
simulator's truth. Used by tests/proxy/relay/test_fairness_e2e.py and
bench/fairness_http.py."""

from __future__ import annotations

import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

from proxy.app import create_app
from tests.conftest import proxy_settings
from tests.support.fakes.batching_backend import MODEL, SimulatedGpu, make_batching_backend
from tests.support.fakes.batching_engine import EngineConfig
from tests.support.servers import ServerThread

# kind -> (characters of prompt, tokens generated)
KINDS = {"chat": (160, 48), "rag": (16_000, 6), "mid": (2_000, 16)}
WARM_UP = 8  # requests before the scored burst, when warm

Told = tuple[str, str, float, float]  # kind, request id, dynamic joules, band half-width


@dataclass(frozen=True, slots=True)
class HttpOutcome:
    """One run: the kinds' share error, each kind's (told, truth) share, the backend's
    cost model from /readyz, the fraction of requests whose band held the truth, and
    the band's median relative half-width."""

    error: float
    shares: dict[str, tuple[float, float]]
    cost_model: dict[str, Any]
    covered: float
    half_width: float


def send_all(client: openai.OpenAI, mode: str, warm: bool, per_kind: int) -> list[Told]:
    """A warm-up when `warm` (the proxy has seen the engine's queue, as in steady state;
    none: a burst right after start), then `per_kind` of each kind at once."""

    def one(job: tuple[str, int]) -> Told:
        kind, i = job
        chars, tokens = KINDS.get(kind, (100, 8))
        rid = f"{mode}-{kind}-{i}"
        energy = None
        stream = client.chat.completions.create(
            model=MODEL, stream=True, max_tokens=tokens,
            messages=[{"role": "user", "content": "x" * chars}],
            extra_headers={"x-request-id": rid},
        )  # fmt: skip
        with stream:
            for chunk in stream:
                energy = (chunk.model_extra or {}).get("energy", energy)
        assert energy is not None and energy["attribution"] == mode
        half_width = float(energy["joules_high"]) - float(energy["joules"])
        return kind, rid, float(energy["dynamic_joules"]), half_width

    if warm:
        with ThreadPoolExecutor(WARM_UP) as pool:
            list(pool.map(one, [("warm", i) for i in range(WARM_UP)]))
    jobs = [(k, i) for k in KINDS for i in range(per_kind)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(one, jobs))


def run_http(
    tmp_path: Path,
    config: EngineConfig,
    mode: str,
    *,
    gauges: bool = True,
    warm: bool = True,
    per_kind: int = 6,
) -> HttpOutcome:
    """One burst through the proxy to the simulator running `config`. `warm` false: no
    warm-up, and the gauges read at their real period (5 s, 0.25 s while requests may be
    waiting), as right after a deploy; warm: every 0.1 s."""
    app, state = make_batching_backend(config, gauges=gauges)
    with ServerThread(app) as backend:
        settings = proxy_settings(
            tmp_path, backends=[f"sim={backend}"], attribution=mode,
            idle_watts=state.engine.config.cost.idle_w,
            backend_metrics_s=0.1 if warm else 5.0,
        )  # fmt: skip
        proxy_app = create_app(settings, sources=[SimulatedGpu(state)])
        with (
            ServerThread(proxy_app) as proxy,
            openai.OpenAI(base_url=f"{proxy}/v1", api_key="x", max_retries=0) as client,
        ):
            told = send_all(client, mode, warm, per_kind)
            (ready,) = httpx.get(f"{proxy}/readyz").json()["backends"]
        truth = httpx.get(f"{backend}/truth").json()
    return score(told, truth, ready["cost_model"])


def score(told: list[Told], truth: dict[str, float], cost_model: dict[str, Any]) -> HttpOutcome:
    """The kinds' shares as told against the truth's, and the bands' coverage."""
    told_total = sum(j for _, _, j, _ in told)
    truth_total = sum(truth[rid] for _, rid, _, _ in told)
    covered = sum(1 for _, rid, j, band in told if abs(j - truth[rid]) <= band) / len(told)
    half = statistics.median(band / j for _, _, j, band in told if j > 0.0)
    shares = {}
    for kind in KINDS:
        mine = [(rid, j) for k, rid, j, _ in told if k == kind]
        shares[kind] = (
            sum(j for _, j in mine) / told_total,
            sum(truth[rid] for rid, _ in mine) / truth_total,
        )
    error = sum(abs(a - b) for a, b in shares.values()) / len(shares)
    return HttpOutcome(error, shares, cost_model, covered, half)
