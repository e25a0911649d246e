"""The engine's prefill chunk: what a chunked-prefill engine prefills a step, how a prompt
shares it, and how the streams show it where it is not configured. Pure: no I/O, no clock.

An engine that prefills in chunks (vLLM's `--max-num-batched-tokens`, on by default in its
V1 engine) runs a long prompt over several steps, a chunk a step, beside the decoding
requests; the chunk is a budget shared by the prompts prefilling, oldest first, and each
decoding sequence takes a token of it. attribution.py prices each prompt prefilling by
its part of it (`Flight.allotted`): `per_step_tokens` of what `budget_tokens` leaves after
the prompts before it.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

# The engine's chunk, from the streams (`ChunkEvidence`): prompts of at least
# CHUNK_MIN_PROMPT tokens whose prefill is counted in steps where streams decoded through
# at least CHUNK_COVERED of it; CHUNK_EVIDENCE of them that took CHUNK_MIN_STEPS steps or
# more make the split price prefill by the chunk.
CHUNK_MIN_PROMPT = 256.0
CHUNK_COVERED = 0.9
CHUNK_MIN_STEPS = 3.0
CHUNK_EVIDENCE = 3
CHUNK_KEPT = 32
CHUNK_CONTRADICTS = 1.5  # a prompt this many chunks in a step or two says there is none


@dataclass(slots=True)
class ChunkEvidence:
    """What streamed prompts showed of the engine's chunk: for each prompt whose
    prefill took CHUNK_MIN_STEPS steps or more (counted by the tokens the decoding
    streams streamed meanwhile, one a step each), the prompt tokens the engine
    prefilled a step meanwhile: its own and those of the prompts whose prefill ended
    inside its window (an engine shares its budget oldest first: a prompt behind others
    takes their steps too). A prompt of P tokens alone in chunks of C takes
    n = ceil(P / C) steps, and the count is n + 1 more often than not (the step under
    way when it was admitted streams its tokens inside its window), n at times (its
    last step's tokens race its first token): tokens / (count - 1) is what the engine
    prefilled a step, and the chunk is the median of the last CHUNK_KEPT (a few that
    waited while the model took them to run do not move it). A whole-prompt engine's
    prefill counts a step or two; where more are counted because prompts ended inside
    the window, the tokens a step come out above the prompts' own size, which is no
    chunk; a prompt that waited unseen (no such ends) would show a small one, which
    prompts of CHUNK_CONTRADICTS times it prefilled in a step or two then outvote.
    Measured in bench/fairness.py's engines: chunks of 512 and prompts of 4,000
    count 9 (and 8); chunks of 2,048, 3 (and 2); whole prompts 1-2. Pure."""

    # (tokens prefilled a step, the prompt's own tokens)
    seen: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=CHUNK_KEPT))

    def note(self, prompt_tokens: float, steps: float, own_tokens: float) -> float | None:
        """`prompt_tokens` were prefilled over the `steps` of a prompt of `own_tokens`:
        the chunk it is now taken to be (prompt tokens a step), or None (whole prompts
        in a step, as far as the streams show)."""
        if steps >= CHUNK_MIN_STEPS:
            self.seen.append((prompt_tokens / (steps - 1.0), own_tokens))
        else:
            chunk = self.chunk_if_any()
            if chunk is not None and own_tokens >= CHUNK_CONTRADICTS * chunk:
                # Well over the chunk in a step or two: the chunk is wrong (learnt from
                # prompts that waited unseen), or this count was one short; this one
                # says a prompt goes in whole.
                self.seen.append((own_tokens, own_tokens))
        return self.chunk_if_any()

    def chunk_if_any(self) -> float | None:
        """The chunk the prompts seen show, or None (too few, or no prompt split)."""
        if len(self.seen) < CHUNK_EVIDENCE:
            return None
        chunk = statistics.median(s for s, _ in self.seen)
        return chunk if chunk < statistics.median(p for _, p in self.seen) else None


def budget_tokens(chunk: float | None, configured: bool, decoding: int) -> float | None:
    """The prompt tokens the engine prefills a step now (None: whole prompts). A learnt
    chunk is what prompts were seen to prefill a step; a configured one (vLLM's
    --max-num-batched-tokens) also holds a token of each of the `decoding` sequences."""
    if chunk is None or not configured:
        return chunk
    return max(0.0, chunk - decoding)


def per_step_tokens(prompt: float, chunk: float | None, configured: bool) -> float:
    """The prompt tokens a prompt of `prompt` prefills a step, on average over its
    prefill: a configured chunk C takes P / ceil(P / C) (its last chunk is the rest); a
    learnt one is already what prompts prefilled a step; no chunk, the whole prompt."""
    if chunk is None or prompt <= 0.0:
        return prompt
    if not configured:
        return min(prompt, chunk)
    return prompt / math.ceil(prompt / chunk)


def steps_in_window(
    window_s: float, streamed: float, decoder_s: float, decoded_s: float
) -> float | None:
    """The engine's steps in a window of `window_s`, from the tokens the decoding streams
    streamed in it (`streamed`), the stream-seconds decoding (`decoder_s`) and the
    seconds any stream decoded (`decoded_s`): each streams one token a step. None where
    the streams decoded through less than CHUNK_COVERED of it."""
    if window_s <= 0.0 or decoded_s < CHUNK_COVERED * window_s or decoder_s <= 0.0:
        return None
    return streamed / (decoder_s / decoded_s)


# A prompt prefilling is overdue (waiting in truth, not prefilling) once the steps since
# the backend had it pass this many times those its prefill could take, and this many
# more. The chunk may be learnt high (2,408 for 2,048 through HTTP) and prompts whose
# prefill is unseen (non-streamed) take budget that is not counted: twice, and more.
OVERDUE_FACTOR = 2.0
OVERDUE_STEPS = 4.0
# Where no chunk is known, a prompt is taken to go through in chunks this small (the
# smallest budget vLLM is run with in practice): whole-prompt engines show no stall,
# and a chunked one is only found waiting late, never early.
OVERDUE_MIN_CHUNK = 512.0
OVERDUE_LEAST_BUDGET = 16.0  # a chunk the decoders all but fill still prefills a little


def prefill_overdue(
    steps: float, prefilled_ahead: float, prompt: float, chunk: float | None
) -> bool:
    """Whether `steps` engine steps are far more than a prompt of `prompt` tokens needs
    to prefill, when `prefilled_ahead` prompt tokens of others were prefilled in them
    (the engine shares its chunk oldest first): (ahead + own) / chunk steps, and one for
    the step under way when it came."""
    per_step = OVERDUE_MIN_CHUNK if chunk is None else max(chunk, OVERDUE_LEAST_BUDGET)
    needed = (max(0.0, prefilled_ahead) + prompt) / per_step + 1.0
    return steps > OVERDUE_FACTOR * needed + OVERDUE_STEPS
