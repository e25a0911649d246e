"""The text of a request's prompt, and its size in tokens estimated without a tokenizer. Pure.

`prompt_text` is what a backend's tokenize endpoint is asked to count when a stream
brought no usage; `prompt_tokens_estimate` sets the prefill weight of a request
(metering/accounting/attribution.py) at ~4 characters per token: the proxy does not
tokenise on the hot path, and the estimate is never reported as a token count.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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


def _prompt_texts(payload: Mapping[str, Any]) -> Iterator[str]:
    for key in ("messages", "prompt", "input"):
        yield from _texts(payload.get(key))


def prompt_text(payload: Mapping[str, Any]) -> str:
    """The text a backend tokenizes for this request: the messages' contents (text parts
    only), the prompt or the input, pieces joined by newlines. Chat templates add a few
    tokens this does not see, so a count from it is a slight undercount."""
    return "\n".join(_prompt_texts(payload))


def prompt_tokens_estimate(payload: Mapping[str, Any]) -> float:
    """Estimated prompt tokens of a chat, completion or embedding request (>= 1)."""
    chars = sum(len(t) for t in _prompt_texts(payload))
    return max(1.0, chars / CHARS_PER_TOKEN)
