"""The engine simulator's own rules: admission, chunking, timing, and its Shapley truth."""

from __future__ import annotations

import pytest

from tests.support.fakes.batching_engine import CostModel, Engine, EngineConfig, SimRequest


def run(config: EngineConfig, reqs: list[SimRequest]) -> tuple[Engine, list[tuple[str, str]]]:
    engine = Engine(config)
    events = [(e.kind, e.rid) for e in engine.run(reqs)]
    return engine, events


def test_the_truth_adds_up_to_the_energy_and_splits_the_fixed_cost_equally() -> None:
    cost = CostModel()
    reqs = [SimRequest("a", "chat", 0.0, 10, 3), SimRequest("b", "chat", 0.0, 10, 3)]
    engine, _ = run(EngineConfig(cost=cost), reqs)
    assert sum(r.truth_j for r in reqs) == pytest.approx(sum(s.energy_j for s in engine.steps))
    assert reqs[0].truth_j == pytest.approx(reqs[1].truth_j)  # identical requests, same share
    # Step 1 prefills both (10 tokens each) and samples their first tokens; two decode steps.
    assert len(engine.steps) == 3
    assert engine.steps[0].energy_j == pytest.approx(cost.fixed_j + 20 * cost.prefill_j_per_token)
    assert engine.dynamic_j_at(engine.steps[-1].end_s) == pytest.approx(
        sum(s.energy_j for s in engine.steps)
    )


def test_admission_is_fifo_under_the_limit_and_waiting_costs_nothing() -> None:
    reqs = [SimRequest(f"r{i}", "chat", 0.0, 10, 5) for i in range(3)]
    engine, events = run(EngineConfig(max_running=2), reqs)
    assert all(s.running <= 2 for s in engine.steps)
    assert reqs[2].admitted_s == reqs[0].finished_s  # admitted when the first ones end
    c = CostModel()
    # r0 shared its 5 steps with r1 (half the fixed cost each); r2, admitted later, ran its
    # 5 steps alone and paid nothing for the steps it waited through.
    own = 10 * c.prefill_j_per_token + 4 * c.decode_j_per_seq
    assert reqs[0].truth_j == pytest.approx(5 * c.fixed_j / 2 + own)
    assert reqs[2].truth_j == pytest.approx(5 * c.fixed_j + own)
    assert events.index(("first_token", "r2")) > events.index(("end", "r0"))


def test_chunked_prefill_spreads_a_long_prompt_over_steps() -> None:
    rag = SimRequest("rag", "rag", 0.0, 5000, 2)
    engine, events = run(EngineConfig(prefill_chunk=2048), [rag])
    assert [e for e in events if e[0] != "token"] == [
        ("start", "rag"), ("first_token", "rag"), ("end", "rag"),
    ]  # fmt: skip
    assert len(engine.steps) == 4  # 2048 + 2048 + 904 prompt tokens, then one decode step
    assert rag.first_token_s == engine.steps[2].end_s


def test_embeddings_end_with_their_prefill() -> None:
    emb = SimRequest("e", "embed", 0.0, 300, 0)
    engine, events = run(EngineConfig(), [emb])
    assert events == [("start", "e"), ("end", "e")] and len(engine.steps) == 1
