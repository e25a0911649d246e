"""Request weights for token-weighted attribution (`--attribution tokens`). Pure.

The energy of each interval between two readings is split among the requests in flight
in proportion to their weights (see ledger.py). A weight stands for the work the
inference engine does for a request per step:

- **prefill** (from the request's start until its first streamed token): the number of
  prompt tokens, estimated from the request body at ~4 characters per token (the proxy
  does not tokenise on the hot path; the estimate only sets a weight, it is never
  reported as a token count);
- **decode** (from the first streamed token to the end): 1. A continuous-batching engine
  advances every running sequence by one token per step, so each decoding request is
  one unit of the step's work, and a request that streams twice the tokens stays in
  decode twice as many steps and gets twice the decode energy;
- **non-streaming chat/completions**: the proxy cannot see when the first token is made,
  so such a request weighs 1 throughout (like a decoding stream); its prefill is
  under-weighted, which is the cost of not seeing inside the response;
- **embeddings**: all prefill, so the prompt estimate throughout.

With `--attribution equal` every request weighs 1 throughout.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

CHARS_PER_TOKEN = 4.0  # OpenAI's rule of thumb for English text; a weight, not a count


def _texts(value: Any) -> Iterator[str]:
    """The text pieces of a prompt field: strings, in lists, and chat messages' and
    content parts' `content` / `text` (images and token ids carry none)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _texts(v)
    elif isinstance(value, dict):
        # chat content parts: {"type": "text", "text": ...}; images etc. count nothing
        yield from _texts(value.get("text"))
        yield from _texts(value.get("content"))


def _prompt_texts(payload: dict[str, Any]) -> Iterator[str]:
    for key in ("messages", "prompt", "input"):
        yield from _texts(payload.get(key))


def prompt_text(payload: dict[str, Any]) -> str:
    """The text a backend tokenizes for this request: the messages' contents (text parts
    only), the prompt or the input, pieces joined by newlines. Chat templates add a few
    tokens this does not see, so a count from it is a slight undercount."""
    return "\n".join(_prompt_texts(payload))


def prompt_tokens_estimate(payload: dict[str, Any]) -> float:
    """Estimated prompt tokens of a chat, completion or embedding request (>= 1)."""
    chars = sum(len(t) for t in _prompt_texts(payload))
    return max(1.0, chars / CHARS_PER_TOKEN)


def initial_weight(mode: str, payload: dict[str, Any], *, stream: bool, embeddings: bool) -> float:
    """The weight a request starts with."""
    if mode == "equal":
        return 1.0
    if stream or embeddings:
        return prompt_tokens_estimate(payload)
    return 1.0


DECODE_WEIGHT = 1.0
