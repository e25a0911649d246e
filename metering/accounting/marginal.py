"""What one more request of a given shape would cost a backend, from its cost model. Pure.

The cost model (cost_model.py) prices a step at a fixed cost F (watts at the default step
rate: F / DEFAULT_DECODE_TOKENS_PER_S joules a step), plus its prompt tokens' and decoded
tokens' own work. A request of P prompt tokens and O output tokens runs about O decode
steps and P / chunk prefill steps (one where the backend prefills whole prompts), and the
split gives it its own work plus an equal share of each step's fixed cost among the
requests in that step. So what it adds to the dynamic energy the backend is told is

    J = p P + d O + (F / rate) (O + prefill steps) / n

with n the batch it joins (the requests running beside it, itself included). That is
what its record will say (within the split's own band), not the average joules per token
with the idle draw in it, which falls as the backend gets busier. Its standard error is
each coefficient's error (their logs' spread as band.py holds it) carried through.

Figures are per output token (the project's `joules_per_token` rule: completion tokens,
or prompt tokens when it completes none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from metering.accounting.cost_model import DEFAULT_DECODE_TOKENS_PER_S, Coefficients

# The shape of the gauges' reference request: a chat turn with some context.
REFERENCE_PROMPT_TOKENS = 512
REFERENCE_OUTPUT_TOKENS = 128
Z90 = 1.645  # the gauges' band: a central 90 % interval of a normal estimate


@dataclass(frozen=True, slots=True)
class Marginal:
    """A request's estimated dynamic joules and its standard error, and the tokens a
    per-token figure divides by."""

    joules: float
    std_error_j: float
    tokens: int

    @property
    def j_per_token(self) -> float:
        return self.joules / self.tokens

    @property
    def se_per_token(self) -> float:
        return self.std_error_j / self.tokens

    def band_per_token(self, z: float = Z90) -> tuple[float, float]:
        """(low, high): a central interval of the per-token figure (90 % by default)."""
        return (
            max(0.0, self.j_per_token - z * self.se_per_token),
            self.j_per_token + z * self.se_per_token,
        )


def prefill_steps(prompt_tokens: float, chunk_tokens: float | None) -> float:
    """The steps a prompt takes to prefill: one where whole prompts are prefilled."""
    if prompt_tokens <= 0.0:
        return 0.0
    if chunk_tokens is None or chunk_tokens <= 0.0:
        return 1.0
    return math.ceil(prompt_tokens / chunk_tokens)


def marginal(
    coefficients: Coefficients,
    log_sds: tuple[float, float, float],
    *,
    prompt_tokens: float,
    output_tokens: float,
    batch: float,
    chunk_tokens: float | None = None,
) -> Marginal:
    """The dynamic energy one request of this shape adds at a backend whose batch it
    would join is `batch` requests (itself included; at least 1). `log_sds`: how unsure
    the log of each coefficient is (fixed, prefill, decode), as band.py keeps them."""
    p_tok, o_tok = max(0.0, prompt_tokens), max(0.0, output_tokens)
    n = max(1.0, batch)
    steps = o_tok + prefill_steps(p_tok, chunk_tokens)
    parts = (
        coefficients.fixed_w / DEFAULT_DECODE_TOKENS_PER_S * steps / n,
        coefficients.prefill_j_per_token * p_tok,
        coefficients.decode_j_per_token * o_tok,
    )
    # A coefficient's error, from its log's: c * sd (the first-order term).
    se = math.sqrt(sum((part * sd) ** 2 for part, sd in zip(parts, log_sds, strict=True)))
    tokens = int(o_tok) if o_tok >= 1.0 else max(1, int(p_tok))
    return Marginal(sum(parts), se, tokens)
