"""The tokens a backend prefills in one step, learnt from what its other streams do
during a prompt's prefill (metering/accounting/chunks.py), and the split that uses it."""

from __future__ import annotations

import pytest

from metering.accounting.attribution import MODEL, Attribution, EngineQueue, Flight
from metering.accounting.chunks import ChunkEstimate, estimate, prefill_steps


def test_a_whole_prompt_takes_one_step_and_the_one_in_progress() -> None:
    assert prefill_steps(1.0) == 1
    assert prefill_steps(2.0) == 1  # the step under way when it arrived, then its own
    assert prefill_steps(9.0) == 8  # 4,000 tokens in chunks of 512, and that first step


def test_whole_prompts_leave_the_estimate_at_none() -> None:
    est = ChunkEstimate()
    for streamed in (2, 4, 2, 4):  # two streams decoding: one or two steps each
        est.observe(4000, streamed, 2)
    assert est.tokens_per_step is None


def test_chunked_prompts_show_their_chunk() -> None:
    est = ChunkEstimate()
    for streamed in (18, 16, 18):  # two streams: nine and eight steps
        est.observe(4000, streamed, 2)
    assert est.tokens_per_step == pytest.approx(4000 / 8)


def test_small_prompts_and_no_decoders_tell_nothing() -> None:
    est = ChunkEstimate()
    est.observe(500, 40, 2)  # one that waited: not a 25-token chunk
    est.observe(4000, 18, 0)  # nothing decoded beside it: no steps to count
    est.observe(4000, 18, 0.5)
    assert est.tokens_per_step is None and not est.seen


def test_a_large_prompt_in_one_step_contradicts_a_chunk() -> None:
    seen = [(4000.0, 8), (4000.0, 8)]
    assert estimate(seen) == pytest.approx(500.0)
    assert estimate([*seen, (4000.0, 1)]) is None  # whole prompts after all
    assert estimate([*seen, (600.0, 1)]) == pytest.approx(500.0)  # fits one chunk: no news


def flight(prompt: float, stream: bool = True) -> Flight:
    return Flight(prompt, stream=stream)


def test_the_split_prices_a_chunked_prompt_per_chunk() -> None:
    """Two chats decode while a 4,000-token prompt prefills and each streams nine tokens:
    the next such prompt is priced at the tokens a step holds (500), not all 4,000 at each
    of its steps."""
    attribution, queue = Attribution(MODEL), EngineQueue()
    chats = [flight(40), flight(40)]
    for c in chats:
        attribution.start(c, queue, 0.0)
        attribution.first_token(c, queue)
    assert queue.decode_streams == 2
    rag = flight(4000)
    whole = attribution.start(rag, queue, 1.0)
    assert whole == pytest.approx(queue.price.prefill_j_per_token * 4000)
    queue.streamed += 18  # nine steps of the two chats
    attribution.first_token(rag, queue)
    assert queue.chunks.tokens_per_step == pytest.approx(500.0)
    second = flight(4000)
    assert attribution.start(second, queue, 2.0) == pytest.approx(whole / 8)
    # A stream that ends no longer counts as decoding.
    attribution.finish(chats[0], queue, 3.0)
    assert queue.decode_streams == 2  # the other chat, and the first prompt now decoding


def test_whole_prompts_keep_the_whole_price() -> None:
    attribution, queue = Attribution(MODEL), EngineQueue()
    chat = flight(40)
    attribution.start(chat, queue, 0.0)
    attribution.first_token(chat, queue)
    for k in range(3):
        rag = flight(4000)
        w = attribution.start(rag, queue, 1.0 + k)
        queue.streamed += 2  # the step under way, then its own
        attribution.first_token(rag, queue)
        assert w == pytest.approx(queue.price.prefill_j_per_token * 4000)
    assert queue.chunks.tokens_per_step is None
