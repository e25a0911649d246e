"""How far a backend's own token counts differ from the proxy's. Pure arithmetic.

Both sides count from a common start, the proxy's first good read of the backend's
counters: the backend's tokens since then, minus the tokens of the requests the proxy
finished for it since then, is what the backend did without the proxy. While requests are
in flight the backend is ahead (it counts tokens as it makes them, the proxy when a request
ends), so the gap is meaningful when the backend is idle, and grows for good only when
traffic bypasses the proxy. A backend restart (its counters fall) starts a new baseline.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TokenTally:
    """Tokens the proxy finished for one backend since it started."""

    prompt: int = 0
    completion: int = 0


@dataclass(frozen=True, slots=True)
class Baseline:
    own_prompt: float
    own_completion: float
    proxy_prompt: int
    proxy_completion: int
    # The backend's counters at the latest read (a fall below them is a restart).
    last_prompt: float = 0.0
    last_completion: float = 0.0


def rebase(
    base: Baseline | None, own_prompt: float, own_completion: float, tally: TokenTally
) -> Baseline:
    """The baseline after a read: a new one at the first read and whenever the backend's
    counters fell since the last read (it restarted); else the old one, moved to this read."""
    if base is None or own_prompt < base.last_prompt or own_completion < base.last_completion:
        return Baseline(
            own_prompt, own_completion, tally.prompt, tally.completion, own_prompt, own_completion
        )
    return Baseline(
        base.own_prompt,
        base.own_completion,
        base.proxy_prompt,
        base.proxy_completion,
        own_prompt,
        own_completion,
    )


def untracked_tokens(
    base: Baseline, own_prompt: float, own_completion: float, tally: TokenTally
) -> tuple[float, float]:
    """(prompt, completion) tokens the backend processed that the proxy did not see."""
    return (
        (own_prompt - base.own_prompt) - (tally.prompt - base.proxy_prompt),
        (own_completion - base.own_completion) - (tally.completion - base.proxy_completion),
    )
