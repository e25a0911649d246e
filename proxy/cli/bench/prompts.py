"""The prompts of a run, from `proxy.cli.bench.prompt_set` (builtin:v1 or the user's JSONL)."""

from __future__ import annotations

from collections.abc import Sequence

from proxy.cli.bench.prompt_set import load_prompt_set
from proxy.cli.bench.runner import PromptLike


class PromptSetError(ValueError):
    """The prompt set could not be loaded: a bad spec or file (a usage error, exit 2)."""


def load_prompts(spec: str, per_category: int | None = None) -> list[PromptLike]:
    """`spec` is `builtin:NAME` or a JSONL path; `per_category` keeps the first N of each."""
    try:
        prompt_set = load_prompt_set(spec)
        if per_category is not None:
            prompt_set = prompt_set.subset(per_category)
    except (OSError, ValueError) as exc:
        raise PromptSetError(f"prompt set {spec!r}: {exc}") from exc
    return list(prompt_set.prompts)


def categories_of(prompts: Sequence[PromptLike]) -> list[str]:
    return list(dict.fromkeys(p.category for p in prompts))
