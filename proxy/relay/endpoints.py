"""The backend APIs the proxy meters, by path. Pure data: one dict lookup per request.

Each metered path names its kind (the `endpoint` label and field), whether its answers
may stream and in which event grammar, whether its work is all prefill (no generated
tokens: embeddings, rerank, scores, pooling), whether its body is JSON or a multipart
upload, and whether `model` may be left out (vLLM's pooling APIs default to the served
model; the generation APIs need one).
"""

from __future__ import annotations

from dataclasses import dataclass

# The stream grammars the relay knows: OpenAI chunks ending in `data: [DONE]` (chat,
# completions, audio), the Responses API's typed events, Anthropic's Messages events.
CHUNKS = "chunks"
RESPONSES = "responses"
MESSAGES = "messages"


@dataclass(frozen=True, slots=True)
class Endpoint:
    kind: str  # chat, completions, embeddings, responses, messages, audio, rerank, score, pooling
    stream_style: str | None = CHUNKS  # None: never streams
    all_prefill: bool = False
    multipart: bool = False
    model_required: bool = True
    # The proxy asks a chunk stream for its usage (`stream_options.include_usage`).
    asks_for_usage: bool = False


_CHAT = Endpoint("chat", asks_for_usage=True)
_COMPLETIONS = Endpoint("completions", asks_for_usage=True)
_EMBEDDINGS = Endpoint("embeddings", None, all_prefill=True)
_AUDIO = Endpoint("audio", multipart=True)


def _pooled(kind: str) -> Endpoint:
    return Endpoint(kind, None, all_prefill=True, model_required=False)


METERED: dict[str, Endpoint] = {
    "/v1/chat/completions": _CHAT,
    "/v1/completions": _COMPLETIONS,
    "/v1/embeddings": _EMBEDDINGS,
    "/v2/embed": _pooled("embeddings"),
    "/v1/responses": Endpoint("responses", RESPONSES),
    "/v1/messages": Endpoint("messages", MESSAGES),
    "/v1/audio/transcriptions": _AUDIO,
    "/v1/audio/translations": _AUDIO,
    "/v1/rerank": _pooled("rerank"),
    "/rerank": _pooled("rerank"),
    "/v2/rerank": _pooled("rerank"),
    "/score": _pooled("score"),
    "/v1/score": _pooled("score"),
    "/pooling": _pooled("pooling"),
    "/classify": _pooled("pooling"),
}
ENDPOINT_KINDS = frozenset(e.kind for e in METERED.values())
