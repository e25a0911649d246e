"""What one more request adds at a backend (metering/accounting/marginal.py)."""

from __future__ import annotations

import math

import pytest

from metering.accounting.cost_model import DEFAULT_DECODE_TOKENS_PER_S, Coefficients
from metering.accounting.marginal import marginal, prefill_steps

COEFS = Coefficients(fixed_w=290.0, prefill_j_per_token=0.002, decode_j_per_token=0.01)
EXACT = (0.0, 0.0, 0.0)


def test_its_own_work_plus_its_share_of_each_steps_fixed_cost() -> None:
    m = marginal(COEFS, EXACT, prompt_tokens=1000, output_tokens=100, batch=4)
    fixed_per_step = 290.0 / DEFAULT_DECODE_TOKENS_PER_S  # 1 J
    want = 0.002 * 1000 + 0.01 * 100 + fixed_per_step * (100 + 1) / 4
    assert m.joules == pytest.approx(want)
    assert m.tokens == 100 and m.j_per_token == pytest.approx(want / 100)
    assert m.std_error_j == 0.0


def test_a_bigger_batch_shares_the_fixed_cost_among_more() -> None:
    alone = marginal(COEFS, EXACT, prompt_tokens=10, output_tokens=50, batch=1)
    eight = marginal(COEFS, EXACT, prompt_tokens=10, output_tokens=50, batch=8)
    own_work = 0.002 * 10 + 0.01 * 50
    assert alone.joules - own_work == pytest.approx(8 * (eight.joules - own_work))
    # a batch below one (nothing measured) counts as one
    assert marginal(COEFS, EXACT, prompt_tokens=10, output_tokens=50, batch=0).joules == (
        pytest.approx(alone.joules)
    )


def test_chunked_prefill_counts_its_steps() -> None:
    assert prefill_steps(0, 512) == 0.0
    assert prefill_steps(100, None) == 1.0
    assert prefill_steps(1025, 512) == 3.0


def test_the_error_carries_each_coefficients_through() -> None:
    sds = (0.5, 0.1, 0.2)
    m = marginal(COEFS, sds, prompt_tokens=1000, output_tokens=100, batch=2)
    parts = (290.0 / DEFAULT_DECODE_TOKENS_PER_S * 101 / 2, 2.0, 1.0)
    want = math.sqrt(sum((p * s) ** 2 for p, s in zip(parts, sds, strict=True)))
    assert m.std_error_j == pytest.approx(want)
    low, high = m.band_per_token()
    assert low < m.j_per_token < high
    assert high - m.j_per_token == pytest.approx(1.645 * want / 100)


def test_an_embedding_is_per_prompt_token() -> None:
    m = marginal(COEFS, EXACT, prompt_tokens=300, output_tokens=0, batch=1)
    assert m.tokens == 300
    assert m.joules == pytest.approx(0.6 + 290.0 / DEFAULT_DECODE_TOKENS_PER_S)
