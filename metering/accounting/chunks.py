"""How many prompt tokens a backend prefills in one engine step, learnt from its streams.
Pure: no I/O, no clock.

An engine that prefills whole prompts runs a 4,000-token prompt in one (long) step; one
with chunked prefill (vLLM's `max_num_batched_tokens`, 512 to 16,384) runs it in chunks,
one a step, beside the requests decoding. The split prices a prefilling request's work per
step (attribution.py, `model` mode): the whole prompt in one step is right for the first
kind and charges a chunked prompt for every chunk at each of its steps (eight times over
at 512 a step), which the fit cannot undo.

What tells the two apart is what the other streams do during a prompt's prefill: every
step gives each decoding stream one token, so the tokens streamed beside a prefill,
over the streams decoding, count its steps. A whole prompt shows one or two (the step in
progress when it arrived, then its own); a chunked one, a step per chunk (and that first
partial one). `ChunkEstimate` keeps the recent counts of large prompts and says the
tokens a step holds: None (whole prompts) until prompts are seen to take several steps,
and again as soon as a large prompt is seen to take one.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

# Prompts shorter than this fit in one step of any chunked engine worth the name (vLLM's
# budgets start at 512): they say nothing of the chunk, and one that waited in the
# engine's queue (steps counted that were not its own) would pass for a tiny chunk.
MIN_PROMPT_TOKENS = 1024
RECENT = 8  # observations the estimate looks at
# A prompt seen to run in one step with at least this many times the estimate's tokens
# contradicts it: the engine prefills whole prompts (or chunks larger than that).
CONTRADICTS = 1.5


@dataclass(slots=True)
class ChunkEstimate:
    """The recent (prompt tokens, steps) of large prompts, and what they say."""

    seen: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=RECENT))
    tokens_per_step: float | None = None

    def observe(self, prompt_tokens: float, streamed: int, decoders: float) -> None:
        """A prompt of `prompt_tokens` showed its first token after `streamed` tokens of
        the `decoders` streams decoding meanwhile (on average)."""
        if prompt_tokens < MIN_PROMPT_TOKENS or decoders < 1.0 or streamed < 0:
            return
        self.seen.append((prompt_tokens, prefill_steps(streamed / decoders)))
        self.tokens_per_step = estimate(self.seen)


def prefill_steps(steps_seen: float) -> int:
    """The steps a prefill took, from the steps that went by between its start and its
    first token: the first was already under way when it arrived (half of one, on
    average, and the tokens of its last step may come just after its own)."""
    return max(1, int(steps_seen - 0.5))


def estimate(seen: deque[tuple[float, int]] | list[tuple[float, int]]) -> float | None:
    """Tokens a step holds: the median over the prompts seen to take several steps, or
    None (whole prompts) when none did, or a prompt larger than CONTRADICTS times that
    was seen to take one."""
    chunked = [tokens / steps for tokens, steps in seen if steps >= 2]
    if not chunked:
        return None
    per_step = statistics.median(chunked)
    if any(steps == 1 and tokens > CONTRADICTS * per_step for tokens, steps in seen):
        return None
    return per_step
