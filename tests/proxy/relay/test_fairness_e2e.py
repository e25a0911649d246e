"""The fair split through the whole stack: the real `openai` client, the proxy on a socket,
and the batching engine simulator as a real HTTP backend (it reads as a vLLM, with its
queue gauges), all in real time; the proxy meters the simulator's GPU. Each kind's share
of the dynamic energy, as the requests were told it, against the simulator's truth."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.app import create_app
from tests.conftest import proxy_settings
from tests.support.fakes.batching_backend import MODEL, SimulatedGpu, make_batching_backend, scaled
from tests.support.fakes.batching_engine import EngineConfig
from tests.support.servers import ServerThread

# kind -> (characters of prompt, tokens generated)
KINDS = {"chat": (160, 48), "rag": (16_000, 6), "mid": (2_000, 16)}
PER_KIND = 6


Told = tuple[str, str, float, float]  # kind, request id, dynamic joules, band half-width


def send_all(client: openai.OpenAI, mode: str, warm: bool = True) -> list[Told]:
    """A warm-up (so the proxy has seen the engine's queue gauges, as in steady state;
    none when `warm` is false: a burst right after start), then PER_KIND of each kind at
    once; (kind, request id, dynamic joules told, joules_high - joules)."""

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
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, [("warm", i) for i in range(8)]))
    jobs = [(k, i) for k in KINDS for i in range(PER_KIND)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(one, jobs))


def run(
    tmp_path: Path, mode: str, gauges: bool = True, warm: bool = True
) -> tuple[float, dict[str, tuple[float, float]], dict[str, Any], float]:
    """`warm` false: no warm-up, and the gauges read at their real period (5 s, 0.25 s
    while requests may be waiting), as right after a deploy."""
    # Steps 5x as long as the H100-shaped model's (a decode step 17 ms), 6 admitted.
    config = scaled(EngineConfig(max_running=6, prefill_chunk=2048), 5.0)
    app, state = make_batching_backend(config, gauges=gauges)
    with ServerThread(app) as backend:
        settings = proxy_settings(
            tmp_path / f"{mode}-{gauges}-{warm}", backends=[f"sim={backend}"],
            attribution=mode, idle_watts=state.engine.config.cost.idle_w,
            backend_metrics_s=0.1 if warm else 5.0,
        )  # fmt: skip
        proxy_app = create_app(settings, sources=[SimulatedGpu(state)])
        with (
            ServerThread(proxy_app) as proxy,
            openai.OpenAI(base_url=f"{proxy}/v1", api_key="x", max_retries=0) as client,
        ):
            told = send_all(client, mode, warm)
            (ready,) = httpx.get(f"{proxy}/readyz").json()["backends"]
        truth = httpx.get(f"{backend}/truth").json()
    told_total = sum(j for _, _, j, _ in told)
    truth_total = sum(truth[rid] for _, rid, _, _ in told)
    covered = sum(1 for _, rid, j, band in told if abs(j - truth[rid]) <= band) / len(told)
    shares = {}
    for kind in KINDS:
        mine = [(rid, j) for k, rid, j, _ in told if k == kind]
        shares[kind] = (
            sum(j for _, j in mine) / told_total,
            sum(truth[rid] for rid, _ in mine) / truth_total,
        )
    error = sum(abs(a - b) for a, b in shares.values()) / len(shares)
    return error, shares, ready["cost_model"], covered


Outcomes = dict[str, tuple[float, dict[str, tuple[float, float]], dict[str, Any], float]]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Outcomes:
    tmp = tmp_path_factory.mktemp("fair")
    out = {mode: run(tmp, mode) for mode in ("model", "queue", "tokens", "equal")}
    out["model, no gauges"] = run(tmp, "model", gauges=False)
    out["model, cold"] = run(tmp, "model", warm=False)
    return out


@pytest.mark.parametrize("mode", ["model", "queue"])
def test_the_queued_modes_split_like_the_truth_through_the_whole_stack(
    outcomes: Outcomes, mode: str
) -> None:
    error, _, _, _ = outcomes[mode]
    assert error <= 0.05, outcomes
    assert error <= outcomes["equal"][0], outcomes


def test_without_gauges_the_capacity_is_inferred_through_the_whole_stack(
    outcomes: Outcomes,
) -> None:
    """The same engine with no /metrics: the proxy infers its 6 places from first tokens
    that follow ends (the warm-up's two that waited show it). Racing arrivals can reach
    the engine in another order than the proxy's, which the inference does not always
    undo in real time (0.007 to 0.15 over some 60 runs here, most under 0.03), so only
    "better than equal shares" is asserted; bench/fairness.py has the spread without
    the races."""
    error, _, cost_model, _ = outcomes["model, no gauges"]
    assert cost_model["queue_capacity_source"] == "inferred", cost_model
    assert cost_model["queue_capacity"] >= 6, cost_model
    assert outcomes["model"][2]["queue_capacity_source"] == "learnt"
    assert error < outcomes["equal"][0], outcomes


def test_the_old_modes_are_off_when_requests_queue(outcomes: Outcomes) -> None:
    """12 of 18 requests wait: `tokens` charges the waiting prompts, `equal` the waiting."""
    tokens, shares, _, _ = outcomes["tokens"]
    assert tokens > 0.08 and tokens > 3 * outcomes["queue"][0], outcomes
    told, truth = shares["chat"]
    # The decoding chats paid for the RAG prompts sitting in line: about half their due
    # (0.54 of it once, with the machine's two cores busy with another test run).
    assert told < 0.65 * truth
    assert outcomes["equal"][0] > 0.08, outcomes


def test_a_burst_right_after_start_with_gauges_at_their_real_period(outcomes: Outcomes) -> None:
    """No warm-up, the gauges read at start (idle) and every 5 s, at once and every
    0.25 s while more are in flight than may run: the queue shows before the burst is
    over, or the answers' starts show the limit (issue 31's first case)."""
    error, _, cost_model, _ = outcomes["model, cold"]
    assert error <= 0.05, outcomes
    assert cost_model["queue_capacity"] == 6, cost_model


def test_the_band_covers_the_truth_through_the_whole_stack(outcomes: Outcomes) -> None:
    """`joules_low`/`joules_high` are meant to hold each request's true share 90 % of the
    time (calibrated in virtual time by bench/band.py): in real time, with the gauges or
    without, warm or right after start, most of the 18 requests' truths are inside."""
    for name in ("model", "model, no gauges", "model, cold"):
        assert outcomes[name][3] >= 0.75, (name, outcomes[name][3])
