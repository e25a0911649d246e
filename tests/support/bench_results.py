"""Prompts and results made by hand for the bench tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.cli.bench.results import STATUS_ERROR, STATUS_OK, RequestResult


@dataclass(frozen=True)
class Prompt:
    """Shaped like `proxy.cli.bench.prompt_set.BenchPrompt`."""

    id: str
    category: str
    messages: list[dict[str, str]] = field(
        default_factory=lambda: [{"role": "user", "content": "say hello"}]
    )
    max_tokens: int | None = 4
    temperature: float | None = 0.0
    seed: int | None = 42


def prompts(categories: tuple[str, ...] = ("code", "math"), per: int = 2) -> list[Prompt]:
    return [
        Prompt(f"{c}-{i}", c, [{"role": "user", "content": f"{c} question number {i}"}])
        for c in categories
        for i in range(per)
    ]


def ok(model: str, category: str, joules: float, rep: int = 0, **kw: Any) -> RequestResult:
    base: dict[str, Any] = {
        "model": model,
        "category": category,
        "prompt_id": f"{category}-x",
        "repetition": rep,
        "status": STATUS_OK,
        "joules": joules,
        "method": "constant",
        "http_status": 200,
    }
    base.update(kw)
    return RequestResult(**base)


def failed(model: str, category: str, error: str = "HTTP 500: boom", **kw: Any) -> RequestResult:
    base: dict[str, Any] = {
        "model": model,
        "category": category,
        "prompt_id": f"{category}-x",
        "repetition": 0,
        "status": STATUS_ERROR,
        "error": error,
        "http_status": 500,
    }
    base.update(kw)
    return RequestResult(**base)
