"""What differs between the servers the proxy fronts, as data and pure functions.

One `Kind` per server family (the `/readyz` `kind` values): where its health check is and
how to read it, where its models are listed, whether its streams carry usage when asked
(`stream_options.include_usage`), how to count tokens with it, and which of its own
Prometheus metrics help. No I/O here: backends/adapters.py does the fetching, and
backends/detect.py decides a kind from what a server answers.

Sources for each fact are in tests/support/fakes/recorded/README.md, beside the recorded answers
the tests replay.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from backends.own_metrics import (
    ANY_METRICS,
    LLAMACPP_METRICS,
    TGI_METRICS,
    VLLM_METRICS,
    MetricNames,
)

VLLM = "vllm"
TGI = "tgi"
LLAMACPP = "llamacpp"  # llama.cpp's own llama-server
LLAMA_CPP_PYTHON = "llama-cpp-python"
OLLAMA = "ollama"
OPENAI = "openai"  # any other OpenAI-compatible server
AUTO = "auto"  # configured: detect the kind from what the server answers

KIND_NAMES = (VLLM, TGI, LLAMACPP, LLAMA_CPP_PYTHON, OLLAMA, OPENAI)

MODELS_PATH = "/v1/models"


# --- reading answers (pure) ----------------------------------------------------------


def openai_models(doc: object) -> list[dict[str, Any]] | None:
    """The entries of an OpenAI model list (`{"object": "list", "data": [...]}`) that
    have an id; None when `doc` is not such a list."""
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        return None
    return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


def ollama_tags_models(doc: object) -> list[dict[str, Any]] | None:
    """Ollama's own list (`GET /api/tags`: `{"models": [{"name", ...}]}`) as OpenAI
    entries, the way Ollama's `/v1/models` presents them."""
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, list):
        return None
    return [
        {"id": m["name"], "object": "model", "owned_by": _ollama_namespace(m["name"])}
        for m in models
        if isinstance(m, dict) and isinstance(m.get("name"), str)
    ]


def _ollama_namespace(name: str) -> str:
    """`user/model:tag` -> `user`; a bare `model:tag` is in Ollama's `library`."""
    parts = name.split("/")
    return parts[-2] if len(parts) >= 2 else "library"


def token_count(doc: object) -> int | None:
    """The number of tokens in a tokenize answer, whichever of the known shapes it has:
    `{"count": n}` (vLLM, llama-cpp-python's /extras/tokenize/count), `{"tokens": [...]}`
    (llama.cpp, llama-cpp-python) or a bare list of tokens (TGI)."""
    if isinstance(doc, list):
        return len(doc)
    if isinstance(doc, dict):
        count = doc.get("count")
        if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
            return count
        tokens = doc.get("tokens")
        if isinstance(tokens, list):
            return len(tokens)
    return None


def _healthy_if_answered(doc: object) -> str | None:
    return None  # a 200 is the whole answer (vLLM and TGI send an empty body)


def _llamacpp_health(doc: object) -> str | None:
    if isinstance(doc, dict) and doc.get("status") == "ok":
        return None
    return f"GET /health answered {doc!r}, not {{'status': 'ok'}}"


def _ollama_health(doc: object) -> str | None:
    if isinstance(doc, dict) and isinstance(doc.get("version"), str):
        return None
    return "GET /api/version did not name a version"


# --- the kinds -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """`GET path`; a 200 whose body `problem` finds nothing wrong with is healthy."""

    path: str
    json: bool  # read the body as JSON (else as text)
    problem: Callable[[object], str | None]


@dataclass(frozen=True, slots=True)
class Tokenizer:
    """`POST path` with `body(model, text)`; `token_count` reads the answer."""

    path: str
    body: Callable[[str, str], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Kind:
    name: str
    # None: the server has no health endpoint; reading its model list is the check.
    health: HealthCheck | None
    # Tried in order; the first that answers is the list. Each pairs a path with its reader.
    models: tuple[tuple[str, Callable[[object], list[dict[str, Any]] | None]], ...]
    # Sends a usage chunk in streams when asked with stream_options.include_usage.
    stream_usage: bool
    # None: no way to count tokens with the server itself.
    tokenizer: Tokenizer | None
    # None: no Prometheus endpoint worth scraping.
    metrics: MetricNames | None
    metrics_path: str = "/metrics"
    # One request at a time, and any other request (a model list, a tokenize) that arrives
    # while a stream runs cuts that stream off: llama-cpp-python's `interrupt_requests`,
    # on by default. The proxy then sends it nothing of its own while it serves a request.
    serial: bool = False
    # Takes the client's x-request-id as it is. llama-cpp-python answers a bare 400 to any
    # that is not a UUID (starlette-context's RequestIdPlugin), so it is not forwarded there.
    forwards_request_id: bool = True


_OPENAI_LIST = ((MODELS_PATH, openai_models),)

KINDS: Mapping[str, Kind] = {
    k.name: k
    for k in (
        Kind(
            VLLM,
            health=HealthCheck("/health", json=False, problem=_healthy_if_answered),
            models=_OPENAI_LIST,
            stream_usage=True,
            tokenizer=Tokenizer("/tokenize", lambda model, text: {"model": model, "prompt": text}),
            metrics=VLLM_METRICS,
        ),
        Kind(
            TGI,
            health=HealthCheck("/health", json=False, problem=_healthy_if_answered),
            models=_OPENAI_LIST,
            # Yes, with an empty "id" on every chunk (3.x: a separate chunk with
            # "choices": []; 2.x: usage rides on the chunk with the finish_reason).
            stream_usage=True,
            tokenizer=Tokenizer("/tokenize", lambda model, text: {"inputs": text}),
            metrics=TGI_METRICS,
        ),
        Kind(
            LLAMACPP,
            health=HealthCheck("/health", json=True, problem=_llamacpp_health),
            models=_OPENAI_LIST,
            stream_usage=True,  # since b6xxx (2025); older builds may not
            tokenizer=Tokenizer("/tokenize", lambda model, text: {"content": text}),
            metrics=LLAMACPP_METRICS,  # only when started with --metrics
        ),
        Kind(
            LLAMA_CPP_PYTHON,
            health=None,
            models=_OPENAI_LIST,
            stream_usage=False,  # ignores stream_options (checked with 0.3.36)
            tokenizer=Tokenizer(
                "/extras/tokenize", lambda model, text: {"input": text, "model": model}
            ),
            metrics=None,
            serial=True,
            forwards_request_id=False,
        ),
        Kind(
            OLLAMA,
            health=HealthCheck("/api/version", json=True, problem=_ollama_health),
            models=(*_OPENAI_LIST, ("/api/tags", ollama_tags_models)),
            stream_usage=True,  # since 0.5.2
            tokenizer=None,
            metrics=None,
        ),
        Kind(
            OPENAI,
            health=None,
            models=_OPENAI_LIST,
            stream_usage=True,  # the OpenAI API's promise; the relay counts if it breaks it
            tokenizer=None,
            # An unknown server might still be one of the above behind another front:
            # its /metrics is read for any name we know.
            metrics=ANY_METRICS,
        ),
    )
}


def kind_named(name: str) -> Kind:
    """The `Kind` called `name`; ValueError for a name that is not one."""
    try:
        return KINDS[name]
    except KeyError:
        allowed = ", ".join((AUTO, *KIND_NAMES))
        raise ValueError(f"unknown backend kind {name!r} (one of: {allowed})") from None
