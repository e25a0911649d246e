"""Chunked prefill in `model` mode (metering/accounting/attribution.py): a prompt priced
by the chunk it runs in each step, the chunk shared oldest first, and the chunk learnt
from the steps streamed prompts took."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metering.accounting.attribution import Attribution
from metering.accounting.chunk import ChunkEvidence
from metering.accounting.queue_model import DECODE, EngineQueue, Flight

C_PREFILL = 0.005  # the WorkPrice default, joules a prompt token


def test_a_configured_chunk_is_shared_oldest_first() -> None:
    attr, q = Attribution(), EngineQueue(chunk_configured=2048.0)
    a, b, chat, d = Flight(4000.0), Flight(4000.0), Flight(300.0), Flight(300.0)
    # 4,000 tokens in chunks of 2,048: two steps, 2,000 a step on average.
    assert attr.start(a, q, 0.0) == pytest.approx(C_PREFILL * 2000)
    assert attr.start(b, q, 0.001) == pytest.approx(C_PREFILL * 48)  # what a leaves
    # The budget is spent: the chat is not in the steps (no work, no fixed cost).
    assert attr.start(chat, q, 0.002) == 0.0 and chat.eq == 0.0
    assert q.allotted_tokens == 2048.0 and q.chunk_source() == "configured"
    attr.first_token(a, q, 0.05)
    changed = dict((id(f), w) for f, w in attr.step_ended(q, 0.05))
    # a decodes (a token of the budget each step); b takes its 2,000 a step, the chat
    # the rest.
    assert changed == {
        id(b): pytest.approx(C_PREFILL * 2000),
        id(chat): pytest.approx(C_PREFILL * 47),
    }
    assert chat.eq == 1.0 and q.allotted_tokens == 2047.0
    attr.first_token(b, q, 0.1)
    changed = dict((id(f), w) for f, w in attr.step_ended(q, 0.1))
    assert changed == {id(chat): pytest.approx(C_PREFILL * 300)}
    # Two decode now: the budget holds 2,046 prompt tokens, the chat's 300 and d's 300.
    assert attr.start(d, q, 0.11) == pytest.approx(C_PREFILL * 300)
    attr.finish(d, q, 0.12)
    for f in (a, b, chat):
        attr.finish(f, q, 0.2)
    assert q.allotted_tokens == 0.0 and not q.prefilling


def test_without_a_chunk_a_prompt_is_priced_whole() -> None:
    attr, q = Attribution(), EngineQueue()
    a, b = Flight(4000.0), Flight(3000.0)
    assert attr.start(a, q, 0.0) == pytest.approx(C_PREFILL * 4000)
    assert attr.start(b, q, 0.0) == pytest.approx(C_PREFILL * 3000)
    assert q.chunk_source() == "none" and attr.step_ended(q, 0.0) == []


def test_a_request_that_ends_while_prefilling_frees_its_allotment() -> None:
    attr, q = Attribution(), EngineQueue(chunk_configured=1000.0)
    a, b = Flight(800.0), Flight(800.0)
    attr.start(a, q, 0.0)
    assert attr.start(b, q, 0.0) == pytest.approx(C_PREFILL * 200)
    changed = attr.finish(a, q, 0.01)  # a client hung up during its prefill
    assert changed == [(b, pytest.approx(C_PREFILL * 800))]
    assert attr.start(Flight(1500.0), q, 0.02) == pytest.approx(C_PREFILL * 200)
    assert q.allotted_tokens == 1000.0
    with pytest.raises(ValueError, match="prefill chunk must be > 0"):
        EngineQueue(chunk_configured=0.0)


@pytest.mark.parametrize("chunk", [256, 512, 2048])
def test_the_chunk_is_learnt_within_a_quarter(chunk: int) -> None:
    rng = random.Random(chunk)
    evidence, learnt = ChunkEvidence(), None
    for _ in range(40):
        prompt = rng.choice((300.0, 1200.0, 2000.0, 4000.0, 8000.0))
        # As counted in bench/fairness.py's engines: mostly one step more, at times none.
        steps = -(-prompt // chunk) + rng.choice((0, 1, 1, 1))
        learnt = evidence.note(prompt, steps, prompt)
    assert learnt is not None
    assert 0.75 * chunk <= learnt <= 1.25 * chunk


def test_whole_prompt_engines_teach_no_chunk() -> None:
    evidence = ChunkEvidence()
    for i in range(60):  # a step or two each, whatever the prompt
        assert evidence.note(300.0 + 100.0 * (i % 40), 1.0 + (i % 2), 300.0) is None
    assert not evidence.seen
    # Counted a step too many or more (a prompt that waited) yet many prompts' tokens a
    # step: above the prompts' own size, no chunk.
    for k in range(1, 6):
        evidence.note(4000.0 * k * 3, 4.0, 4000.0)
    assert evidence.chunk_if_any() is None


def test_the_count_begins_when_the_backend_has_the_request() -> None:
    """Through HTTP a burst's requests reach the backend some steps after the proxy took
    them, while the running streams go on: counted from the proxy's start, a whole
    prompt (one step) would look like several; from its answer's start it is one."""
    attr, q = Attribution(), EngineQueue()
    chat, t = _decoding_chat(attr, q), 0.01
    for _ in range(5):
        rag = Flight(4000.0)
        attr.start(rag, q, t)
        t = _steps(q, [chat], t, 4)  # relayed to the backend meanwhile
        attr.reached(rag, q, t)
        t += 0.05
        _step(q, [chat], t)  # its one step, the chat's token with it
        attr.first_token(rag, q, t)
        attr.finish(rag, q, t)
    assert not q.chunk.seen and q.chunk_tokens is None


def test_a_prompt_that_waited_moves_the_chunk_little() -> None:
    evidence = ChunkEvidence()
    for _ in range(4):
        evidence.note(4000.0, 9.0, 4000.0)  # chunks of 512: 8 steps, one more counted
    learnt = evidence.note(4000.0, 40.0, 4000.0)  # it waited behind others: many steps more
    assert learnt == pytest.approx(500.0)


def _step(q: EngineQueue, decoders: list[Flight], t: float) -> None:
    """One engine step ends at `t`: every decoding stream streams a token."""
    q.advance_decoders(t)
    q.streamed += len(decoders)


def _steps(q: EngineQueue, decoders: list[Flight], t: float, n: int) -> float:
    """`n` engine steps of 20 ms from `t`: the time the last ends."""
    for _ in range(n):
        t += 0.02
        _step(q, decoders, t)
    return t


def _decoding_chat(attr: Attribution, q: EngineQueue) -> Flight:
    """A chat that starts at 0 and decodes from 10 ms on."""
    chat = Flight(100.0)
    attr.start(chat, q, 0.0)
    attr.first_token(chat, q, 0.01)
    return chat


def test_the_streams_teach_the_chunk_and_prefill_is_priced_by_it() -> None:
    """One chat decodes throughout; RAG prompts of 4,000 tokens run in chunks of 512
    (8 steps of 20 ms each): after three of them the split prices prompts by the chunk."""
    attr, q = Attribution(), EngineQueue()
    chat, t = _decoding_chat(attr, q), 0.01
    for n in range(3):
        rag = Flight(4000.0)
        assert attr.start(rag, q, t) == pytest.approx(C_PREFILL * 4000)  # not known yet
        t = _steps(q, [chat], t, 8)
        attr.first_token(rag, q, t)
        attr.step_ended(q, t)
        assert rag.phase == DECODE
        attr.finish(rag, q, t)
        assert q.chunk_source() == ("learnt" if n == 2 else "none")
    assert q.chunk_tokens == pytest.approx(4000.0 / 7.0)  # 8 counted: 7 steps and one
    nxt = Flight(4000.0)
    assert attr.start(nxt, q, t) == pytest.approx(C_PREFILL * 4000.0 / 7.0)


def test_a_configured_chunk_is_not_overridden_by_the_streams() -> None:
    attr, q = Attribution(), EngineQueue(chunk_configured=8192.0)
    chat, t = _decoding_chat(attr, q), 0.01
    for _ in range(5):
        rag = Flight(4000.0)
        attr.start(rag, q, t)
        t = _steps(q, [chat], t, 8)
        attr.first_token(rag, q, t)
        attr.finish(rag, q, t)
    assert q.chunk_tokens == 8192.0 and not q.chunk.seen


@settings(max_examples=400, deadline=None)
@given(
    chunk=st.one_of(st.none(), st.sampled_from([64.0, 512.0, 2048.0])),
    ops=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 5000)), max_size=60),
)
def test_the_allotments_add_up_whatever_happens(
    chunk: float | None, ops: list[tuple[int, int]]
) -> None:
    """Starts, first tokens, ends and a capacity learnt, in any order: the prefilling
    requests' allotments sum to the queue's total, none beyond its prompt, and together
    within the chunk; nothing is left allotted once all have ended."""
    attr, q = Attribution(), EngineQueue(chunk_configured=chunk)
    flights: list[Flight] = []
    t = 0.0
    for op, n in ops:
        t += 0.01
        if op == 0 or not flights:
            f = Flight(float(n))
            attr.start(f, q, t)
            flights.append(f)
        elif op == 1:
            f = flights[n % len(flights)]
            attr.first_token(f, q, t)
            attr.step_ended(q, t)
        elif op == 2:
            attr.finish(flights.pop(n % len(flights)), q, t)
        else:
            attr.observe(q, running=float(n % 4 + 1), waiting=1.0)
        prefilling = list(q.prefilling.values())
        assert all(0.0 <= f.allotted <= f.prompt_tokens for f in prefilling)
        if chunk is not None:
            assert sum(f.allotted for f in prefilling) == pytest.approx(q.allotted_tokens)
            assert q.allotted_tokens <= chunk + 1e-9
        else:  # whole prompts: nothing to share, nothing summed (O(1) events)
            assert all(f.allotted == f.prompt_tokens for f in prefilling)
            assert q.allotted_tokens == 0.0
    for f in flights:
        attr.finish(f, q, t)
    assert not q.prefilling and q.allotted_tokens == pytest.approx(0.0)


def test_a_prompt_behind_others_counts_their_tokens_too() -> None:
    """Three prompts of 4,000 at once into chunks of 2,048, prefilled oldest first: the
    third's first token comes after six steps (and one counted more), in which the
    engine prefilled all 12,000 tokens: 1,500 a step as counted, not 4,000 / 8."""
    attr, q = Attribution(), EngineQueue()
    chat, t = _decoding_chat(attr, q), 0.01
    for _ in range(3):
        rags = [Flight(4000.0) for _ in range(3)]
        for r in rags:
            attr.start(r, q, t)
        for r in rags:
            decoding = [f for f in (chat, *rags) if f.phase == DECODE]
            t = _steps(q, decoding, t, 3)  # 2 steps a prompt; the first counted one more
            attr.first_token(r, q, t)
            attr.step_ended(q, t)
        for r in rags:
            attr.finish(r, q, t)
    # Counted: 3 steps for 4,000, 6 for 8,000, 9 for 12,000: 2,000, 1,600, 1,500 a step.
    assert q.chunk_tokens == pytest.approx(1600.0)


def test_a_chunk_no_longer_shown_prices_prompts_whole_again() -> None:
    attr, q = Attribution(), EngineQueue()
    q.chunk_tokens = 1000.0  # learnt
    a, b = Flight(4000.0), Flight(4000.0)
    attr.start(a, q, 0.0)
    assert attr.start(b, q, 0.0) == 0.0
    q.chunk_tokens, q.reshare = None, True  # the evidence window moved on
    changed = dict((id(f), w) for f, w in attr.step_ended(q, 0.1))
    assert changed == {
        id(a): pytest.approx(C_PREFILL * 4000),
        id(b): pytest.approx(C_PREFILL * 4000),
    }
    assert b.eq == 1.0 and q.allotted_tokens == 0.0
    assert attr.step_ended(q, 0.2) == []  # nothing more to do


def test_a_chunk_learnt_from_prompts_that_waited_unseen_is_contradicted() -> None:
    """A whole-prompt engine with a limit, its capacity not yet known: prompts the engine
    held waiting count the decode steps they waited, and show a small chunk; prompts
    well over it, prefilled in a step or two once the queue is known, outvote it."""
    evidence = ChunkEvidence()
    for _ in range(3):
        learnt = evidence.note(4000.0, 21.0, 4000.0)
    assert learnt == pytest.approx(200.0)
    for _ in range(4):
        learnt = evidence.note(4000.0, 2.0, 4000.0)
    assert learnt is None


def test_a_decoding_request_ending_reshares_nothing() -> None:
    """The chunk is shared again only when an allotment is freed: the end of a decoding
    request walks no prefilling request (O(1) events)."""
    attr, q = Attribution(), EngineQueue(chunk_configured=512.0)
    chat = _decoding_chat(attr, q)
    attr.step_ended(q, 0.01)
    rags = [Flight(4000.0) for _ in range(50)]
    for r in rags:
        attr.start(r, q, 0.02)
    # 511 a step for prompts (the chat's token takes one): 500 to the first, 11 to the next.
    assert [r.allotted for r in rags[:3]] == [500.0, 11.0, 0.0]
    q.reshare = False
    assert attr.finish(chat, q, 0.03) == [] and not q.reshare
    changed = attr.finish(rags[0], q, 0.04)  # a client hung up mid-prefill
    assert [f for f, _ in changed] == [rags[1], rags[2]]
    assert q.allotted_tokens == pytest.approx(512.0)


def test_a_burst_shows_the_engines_limit_before_any_request_ends() -> None:
    """Twelve requests at once, no gauges, nothing configured: the engine runs four (two
    chats and two RAG prompts of 2,000 tokens in chunks of 1,024) and holds the rest. No
    request ends for a long while, so no start follows an end; but the fifth, a prompt of
    2,000 tokens, shows no first token through many more steps than its prefill and the
    others' could take: the model finds the limit, four, and holds the rest waiting."""
    attr, q = Attribution(), EngineQueue()
    flights = [Flight(100.0 if k % 2 == 0 else 2000.0) for k in range(12)]
    for k, f in enumerate(flights):
        attr.start(f, q, 0.001 * k)
        attr.reached(f, q, 0.02)
    assert q.capacity is None and all(f.phase != "waiting" for f in flights)
    # The chats run first (a step), then the RAG prompts in four steps of 1,024.
    attr.first_token(flights[0], q, 0.04)
    attr.first_token(flights[2], q, 0.04)
    attr.step_ended(q, 0.04)
    t = _steps(q, [flights[0], flights[2]], 0.04, 4)
    for f in (flights[1], flights[3]):
        attr.first_token(f, q, t)
    attr.step_ended(q, t)
    decoders = flights[:4]
    assert attr.stalled(q, t) == []  # the fifth has had no more steps than it may need
    # Forty steps more: the fifth (2,000 tokens, 4,000 prefilled in its window) needed
    # six at most.
    t = _steps(q, decoders, t, 40)
    changed = attr.stalled(q, t)
    assert q.capacity == 4 and q.capacity_source() == "inferred"
    assert {id(f) for f, w in changed} == {id(f) for f in flights[4:]}
    assert all(w == 0.0 for _, w in changed) and all(f.phase == "waiting" for f in flights[4:])
    # When one ends the oldest waiting is admitted in its place, as FIFO does.
    admitted = attr.finish(flights[0], q, t + 0.01)
    assert [f for f, _ in admitted] == [flights[4]]
    # The one admitted prefills and decodes; then one held waiting shows a token while
    # every running request decodes (the meter asks `make_room` first: none to displace):
    # the capacity was larger, and is raised.
    attr.first_token(flights[4], q, t + 0.04)
    assert attr.make_room(flights[5], q) is None
    attr.first_token(flights[5], q, t + 0.05)
    assert q.capacity == 5 and flights[5].phase == DECODE


def test_prefills_that_no_token_shows_ahead_leave_the_limit_unknown() -> None:
    # An engine that admits all: eight non-streamed prompts of 4,000 tokens ahead of a
    # streamed chat, whose prefill they delay far beyond its own. No first token shows
    # theirs ending, so the chat's wait tells nothing of a limit.
    attr, q = Attribution(), EngineQueue()
    chat = _decoding_chat(attr, q)
    for _ in range(8):
        attr.start(Flight(4000.0, stream=False), q, 0.02)
    late = Flight(300.0)
    attr.start(late, q, 0.02)
    attr.reached(late, q, 0.02)
    t = _steps(q, [chat], 0.02, 60)
    assert attr.stalled(q, t) == [] and q.capacity is None


def test_a_configured_chunk_counts_the_decoders_budget() -> None:
    # Chunks of 512 with 400 sequences decoding leave 112 prompt tokens a step: a prompt
    # of 4,000 takes 36 steps, not 8, and is not overdue at 30.
    attr, q = Attribution(), EngineQueue(chunk_configured=512.0)
    decoders = [Flight(10.0) for _ in range(400)]
    for f in decoders:
        attr.start(f, q, 0.0)
        attr.first_token(f, q, 0.001)
    rag = Flight(4000.0)
    attr.start(rag, q, 0.002)
    attr.reached(rag, q, 0.002)
    t = _steps(q, decoders, 0.002, 30)
    assert attr.stalled(q, t) == [] and q.capacity is None
    # Far past it (twice 36 and four more), it is overdue.
    t = _steps(q, decoders, t, 60)
    assert [f for f, _ in attr.stalled(q, t)] == [rag] and q.capacity == 400


def test_the_limit_found_is_never_below_those_decoding() -> None:
    # A newer request decodes while the oldest prompt shows nothing: it raced it to the
    # engine (a burst's arrivals reach it in another order), or the oldest waits on
    # something of its own (a grammar compiling), costing nothing meanwhile either way.
    attr, q = Attribution(), EngineQueue()
    chat = _decoding_chat(attr, q)
    slow, newer = Flight(300.0), Flight(300.0)
    attr.start(slow, q, 0.02)
    attr.reached(slow, q, 0.02)
    attr.start(newer, q, 0.03)
    attr.first_token(newer, q, 0.05)
    t = _steps(q, [chat, newer], 0.05, 60)
    assert [f for f, _ in attr.stalled(q, t)] == [slow]
    assert q.capacity == 2 and newer.phase == DECODE and slow.phase == "waiting"
    # Its first token shows the engine had room: the capacity is raised.
    assert attr.make_room(slow, q) is None
    attr.first_token(slow, q, t + 0.01)
    assert q.capacity == 3


def test_a_whole_prompt_engine_that_admits_all_is_never_found_stalled() -> None:
    # Prompts of 4,000 tokens, first tokens slow to come on a busy engine (a long prefill
    # queue in one step each): below the smallest chunk's count, nothing is inferred.
    attr, q = Attribution(), EngineQueue()
    chat = _decoding_chat(attr, q)
    rags = [Flight(4000.0) for _ in range(8)]
    for f in rags:
        attr.start(f, q, 0.02)
        attr.reached(f, q, 0.02)
    t = _steps(q, [chat], 0.02, 17)  # 4,000 / 512 + 1 = 8.8 steps, twice and four more: 21.6
    assert attr.stalled(q, t) == [] and q.capacity is None
