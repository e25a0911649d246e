"""The fair split through the whole stack: the real `openai` client, the proxy on a socket,
and the batching engine simulator as a real HTTP backend (it reads as a vLLM, with its
queue gauges), all in real time; the proxy meters the simulator's GPU. Each kind's share
of the dynamic energy, as the requests were told it, against the simulator's truth."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fairness_http import HttpOutcome, run_http
from tests.support.fakes.batching_backend import scaled
from tests.support.fakes.batching_engine import EngineConfig


def run(tmp_path: Path, mode: str, gauges: bool = True, warm: bool = True) -> HttpOutcome:
    """Steps 5x as long as the H100-shaped model's (a decode step 17 ms), 6 admitted,
    prefill in chunks of 2,048; 6 requests of each kind at once."""
    config = scaled(EngineConfig(max_running=6, prefill_chunk=2048), 5.0)
    return run_http(tmp_path / f"{mode}-{gauges}-{warm}", config, mode, gauges=gauges, warm=warm)


Outcomes = dict[str, HttpOutcome]


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
    error = outcomes[mode].error
    assert error <= 0.05, outcomes
    assert error <= outcomes["equal"].error, outcomes


def test_without_gauges_the_capacity_is_inferred_through_the_whole_stack(
    outcomes: Outcomes,
) -> None:
    """The same engine with no /metrics: the proxy infers its 6 places from first tokens
    that follow ends (the warm-up's two that waited show it). Racing arrivals can reach
    the engine in another order than the proxy's, which the inference does not always
    undo in real time (0.007 to 0.15 over some 60 runs here, most under 0.03), so only
    "better than equal shares" is asserted; bench/fairness.py has the spread without
    the races."""
    error, cost_model = outcomes["model, no gauges"].error, outcomes["model, no gauges"].cost_model
    assert cost_model["queue_capacity_source"] == "inferred", cost_model
    assert cost_model["queue_capacity"] >= 6, cost_model
    assert outcomes["model"].cost_model["queue_capacity_source"] == "learnt"
    assert error < outcomes["equal"].error, outcomes


def test_the_old_modes_are_off_when_requests_queue(outcomes: Outcomes) -> None:
    """12 of 18 requests wait: `tokens` charges the waiting prompts, `equal` the waiting."""
    tokens, shares = outcomes["tokens"].error, outcomes["tokens"].shares
    assert tokens > 0.08 and tokens > 3 * outcomes["queue"].error, outcomes
    told, truth = shares["chat"]
    # The decoding chats paid for the RAG prompts sitting in line: about half their due
    # (0.54 of it once, with the machine's two cores busy with another test run).
    assert told < 0.65 * truth
    assert outcomes["equal"].error > 0.08, outcomes


def test_a_burst_right_after_start_with_gauges_at_their_real_period(outcomes: Outcomes) -> None:
    """No warm-up, the gauges read at start (idle) and every 5 s, at once and every
    0.25 s while more are in flight than may run: the queue shows before the burst is
    over, or the answers' starts show the limit (issue 31's first case)."""
    error, cost_model = outcomes["model, cold"].error, outcomes["model, cold"].cost_model
    assert error <= 0.05, outcomes
    assert cost_model["queue_capacity"] == 6, cost_model


def test_the_band_covers_the_truth_through_the_whole_stack(outcomes: Outcomes) -> None:
    """`joules_low`/`joules_high` are meant to hold each request's true share 90 % of the
    time (calibrated in virtual time by bench/band.py): in real time, with the gauges or
    without, warm or right after start, most of the 18 requests' truths are inside."""
    for name in ("model", "model, no gauges", "model, cold"):
        assert outcomes[name].covered >= 0.75, (name, outcomes[name].covered)


def test_a_chunk_learnt_through_the_whole_stack_is_near_the_engines(outcomes: Outcomes) -> None:
    """The engine prefills in chunks of 2,048: where the streams showed the chunk (three
    prompts counted at three steps or more; with six RAG prompts a run most often has
    them), it is within a factor of two of it, and said to be learnt, never configured."""
    seen = [o.cost_model for o in outcomes.values() if o.cost_model.get("prefill_chunk_tokens")]
    for cm in seen:
        assert cm["prefill_chunk_source"] == "learnt", cm
        assert 1024.0 <= cm["prefill_chunk_tokens"] <= 4096.0, cm
    for o in outcomes.values():
        assert o.cost_model["prefill_chunk_source"] in ("learnt", "none"), o.cost_model
