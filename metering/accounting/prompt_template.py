"""The tokens a backend's chat template adds to a prompt, learnt from its own counts. Pure.

A stream that brings no usage has its prompt counted by the backend's tokenize endpoint,
which sees the messages' text only (prompt_text.py): a chat template's role markers, and
a default system prompt where the model has one, are not in it. The same prompt sent
without streaming is counted by the backend itself, template included: 36 tokens against
6 for "Why is the sky blue?" on the bundled SmolLM2. So the proxy learns the difference:
when a non-streamed answer carries the backend's count, the same request's text is counted
by the tokenizer once, and what the template added is kept per model and shape (the
number of messages, which sets how many role markers there are). A stream of that model
and shape is then told the text's count plus it: the same count as the backend's own.
Until a shape is learnt, the stream is told the text's count, labelled as such.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_SHAPES = 256  # (model, shape) pairs kept per backend; beyond, nothing more is learnt
# Tokenize calls that gave nothing (no endpoint after all, a busy serial server) before a
# (model, shape) is given up: a backend without a working tokenizer is not asked again on
# every answer.
MAX_TRIES = 3
# A template adds markers, never removes text: a difference outside this is not a
# template's (another tokenizer, a truncated prompt) and is not learnt.
MAX_TEMPLATE_TOKENS = 4096
TEXT_ONLY = "prompt text only"  # the label of a count without the template


# Parts of a request the backend counts in its prompt that the tokenizer's text does not
# hold (a tool's schema, a response format's, an image): such a request's difference is not
# the template's alone, so it teaches nothing, and a stream with them is counted as text.
_UNSEEN_FIELDS = ("tools", "functions", "response_format", "documents", "chat_template")


def _text_only(messages: list[Any]) -> bool:
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and any(
            not isinstance(part, dict) or part.get("type") != "text" for part in content
        ):
            return False
        if isinstance(m, dict) and m.get("tool_calls"):
            return False
    return True


def prompt_shape(payload: Mapping[str, Any]) -> int | None:
    """What sets the template's share: the number of messages of a chat request of text
    messages, 0 for a completion's prompt string; None for other shapes (not learnt, and
    not completed: tools, response formats, images, tool calls are counted by the backend
    but are not in the tokenizer's text)."""
    if any(payload.get(k) for k in _UNSEEN_FIELDS):
        return None
    messages = payload.get("messages")
    if isinstance(messages, list):
        return len(messages) if _text_only(messages) else None
    if isinstance(payload.get("prompt"), str):
        return 0
    return None


@dataclass(slots=True)
class TemplateTokens:
    """Per backend: the tokens its template adds, by (model, shape)."""

    added: dict[tuple[str, int], int] = field(default_factory=dict)
    tries: dict[tuple[str, int], int] = field(default_factory=dict)  # counts that failed

    def wants(self, model: str, shape: int | None) -> bool:
        """Whether a non-streamed answer of this model and shape has something to teach."""
        return (
            shape is not None
            and (model, shape) not in self.added
            and self.tries.get((model, shape), 0) < MAX_TRIES
            and len(self.added) + len(self.tries) < MAX_SHAPES
        )

    def failed(self, model: str, shape: int) -> None:
        """The text could not be counted this time."""
        self.tries[(model, shape)] = self.tries.get((model, shape), 0) + 1

    def learn(self, model: str, shape: int, backend_count: int, text_count: int) -> None:
        """The backend counted `backend_count` for a prompt whose text is `text_count`."""
        added = backend_count - text_count
        if not self.wants(model, shape):
            return
        if 0 <= added <= MAX_TEMPLATE_TOKENS:
            self.added[(model, shape)] = added
        else:
            self.failed(model, shape)  # not a template's: at most MAX_TRIES such tries

    def count(self, model: str, shape: int | None, text_count: int) -> tuple[int, bool]:
        """The prompt's tokens as the backend would count them, and whether the template's
        share was known (False: the text's count alone)."""
        if shape is None:
            return text_count, False
        added = self.added.get((model, shape))
        if added is None:
            return text_count, False
        return text_count + added, True
