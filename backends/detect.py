"""Which kind of server a backend is, for backends configured with kind `auto`.

`decide_kind` is pure: it reads what the server answered to a fixed set of GETs and
applies the rules below, first match wins. `detect_kind` fetches those answers (all at
once, each with a short timeout) and asks it. A server that answers none of them (down,
still starting) is undetermined: None, and the registry asks again on its next refresh.

1. `/metrics` has `vllm:` series                            -> vllm
2. `/info` is TGI's (`model_id` plus its router or token limits) -> tgi
3. `/props` is llama-server's (`default_generation_settings`)  -> llamacpp
4. `/api/version` names a version                          -> ollama
5. `/v1/models` entries `owned_by` "vllm" / "llamacpp" / "me" -> vllm / llamacpp /
   llama-cpp-python (the last is how llama-cpp-python's server fills it)
6. `/metrics` has `tgi_` / `llamacpp:` series               -> tgi / llamacpp
7. `/v1/models` is an OpenAI model list                     -> openai
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from backends.fetch import JsonGetter
from backends.kinds import (
    LLAMA_CPP_PYTHON,
    LLAMACPP,
    MODELS_PATH,
    OLLAMA,
    OPENAI,
    TGI,
    VLLM,
    openai_models,
)

PROBE_TIMEOUT_S = 2.0

_VLLM_SERIES = re.compile(r"^vllm:", re.MULTILINE)
_TGI_SERIES = re.compile(r"^tgi_", re.MULTILINE)
_LLAMACPP_SERIES = re.compile(r"^llamacpp:", re.MULTILINE)
_OWNERS = {"vllm": VLLM, "llamacpp": LLAMACPP, "me": LLAMA_CPP_PYTHON}

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Probes:
    """A server's answers to the detection GETs; None where it gave none (error, not 200,
    not JSON)."""

    metrics: str | None = None  # GET /metrics, text
    info: object = None  # GET /info
    props: object = None  # GET /props
    api_version: object = None  # GET /api/version
    models: object = None  # GET /v1/models

    @property
    def answered(self) -> bool:
        return any(
            x is not None
            for x in (self.metrics, self.info, self.props, self.api_version, self.models)
        )


def _is_tgi_info(doc: object) -> bool:
    if not isinstance(doc, dict) or not isinstance(doc.get("model_id"), str):
        return False
    router = doc.get("router")
    # TGI 0.x has no router field but always its token limits; TEI (embeddings) has
    # model_id too, but neither of these.
    return (isinstance(router, str) and router.startswith("text-generation")) or (
        "max_total_tokens" in doc
    )


def _is_llamacpp_props(doc: object) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("default_generation_settings"), dict)


def _owner_kind(models: object) -> str | None:
    entries = openai_models(models)
    if not entries:
        return None
    owners = {m.get("owned_by") for m in entries}
    if len(owners) == 1:
        owner = owners.pop()
        if isinstance(owner, str):
            return _OWNERS.get(owner)
    return None


def decide_kind(p: Probes) -> str | None:
    """The kind the answers show, by the rules in this module's docstring; None when they
    show nothing (the server did not answer as any OpenAI-compatible server would)."""
    if p.metrics is not None and _VLLM_SERIES.search(p.metrics):
        return VLLM
    if _is_tgi_info(p.info):
        return TGI
    if _is_llamacpp_props(p.props):
        return LLAMACPP
    if isinstance(p.api_version, dict) and isinstance(p.api_version.get("version"), str):
        return OLLAMA
    owner = _owner_kind(p.models)
    if owner is not None:
        return owner
    if p.metrics is not None:
        if _TGI_SERIES.search(p.metrics):
            return TGI
        if _LLAMACPP_SERIES.search(p.metrics):
            return LLAMACPP
    if openai_models(p.models) is not None:
        return OPENAI
    return None


async def _answer(fetch: Awaitable[T]) -> T | None:
    try:
        return await fetch
    except Exception:  # no answer is an answer here: this server lacks that endpoint
        return None


async def probe(getter: JsonGetter, base_url: str, timeout_s: float = PROBE_TIMEOUT_S) -> Probes:
    """Ask `base_url` every detection question at once (at most `timeout_s` in all)."""
    metrics, info, props, api_version, models = await asyncio.gather(
        _answer(getter.get_text(f"{base_url}/metrics", timeout_s)),
        _answer(getter.get_json(f"{base_url}/info", timeout_s)),
        _answer(getter.get_json(f"{base_url}/props", timeout_s)),
        _answer(getter.get_json(f"{base_url}/api/version", timeout_s)),
        _answer(getter.get_json(f"{base_url}{MODELS_PATH}", timeout_s)),
    )
    return Probes(metrics, info, props, api_version, models)


async def detect_kind(
    getter: JsonGetter, base_url: str, timeout_s: float = PROBE_TIMEOUT_S
) -> str | None:
    """The kind of the server at `base_url`, or None while it cannot be told (down)."""
    return decide_kind(await probe(getter, base_url, timeout_s))
