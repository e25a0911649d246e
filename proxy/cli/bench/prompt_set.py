"""Benchmark prompt sets: the built-in `builtin:v1`, or a user's JSONL file of the same shape.

One JSON object per line (blank lines are skipped):

    {"id": "code-001", "category": "code",
     "messages": [{"role": "user", "content": "..."}],
     "max_tokens": 256, "temperature": 0, "seed": 42}

`max_tokens`, `temperature` and `seed` are optional and default to the category's controls
below; `"seed": null` sends no seed. Unknown fields are refused (a typo such as
`"max_token"` would otherwise be silently ignored). A bad line raises `ValueError` naming
the file and line.

Controls, fixed per category so that every model answers the same prompts under the same
limits (the AI Energy Score keeps its task datasets and settings fixed in the same way):

| category      | max_tokens | why                                                          |
|---------------|------------|--------------------------------------------------------------|
| code          | 256        | a small function with a docstring, or a fix plus a sentence  |
| sql           | 128        | one query of 5-15 lines, or a two-sentence explanation       |
| math          | 192        | a worked solution of a few steps and the answer              |
| translation   | 128        | sources are at most 30 words; in a non-Latin script the      |
|               |            | answer can take 2-3x the tokens of the English, still < 128  |
| summarization | 128        | every prompt asks for 1-3 sentences, ~40-60 words or bullets |
| questions     | 160        | a short paragraph                                            |
| (other)       | 128        | user categories without a row here                           |

The caps leave headroom, so most answers end on their own and energy follows each model's
real answer length; the cap only bounds a rambling model, which keeps a run's duration
bounded. temperature 0 (greedy) and seed 42 make repeated runs give the same tokens where
the backend is deterministic; the seed is sent only where it is not None, and a backend
that takes none ignores it.

Nothing here does I/O except `load_prompt_set`, which reads the file or package data.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final


@dataclass(frozen=True, slots=True)
class Controls:
    """Generation settings sent with every prompt of a category."""

    max_tokens: int
    temperature: float
    seed: int | None


BENCH_TEMPERATURE: Final = 0.0
BENCH_SEED: Final = 42
DEFAULT_CONTROLS: Final = Controls(128, BENCH_TEMPERATURE, BENCH_SEED)
CATEGORY_CONTROLS: Final[Mapping[str, Controls]] = MappingProxyType(
    {
        "code": Controls(256, BENCH_TEMPERATURE, BENCH_SEED),
        "sql": Controls(128, BENCH_TEMPERATURE, BENCH_SEED),
        "math": Controls(192, BENCH_TEMPERATURE, BENCH_SEED),
        "translation": Controls(128, BENCH_TEMPERATURE, BENCH_SEED),
        "summarization": Controls(128, BENCH_TEMPERATURE, BENCH_SEED),
        "questions": Controls(160, BENCH_TEMPERATURE, BENCH_SEED),
    }
)

BUILTIN_PREFIX: Final = "builtin:"
# spec -> file in the proxy.cli.bench.prompt_sets package. Published sets never change: a new
# version is a new file and a new spec.
BUILTIN_SETS: Final[Mapping[str, str]] = MappingProxyType({"builtin:v1": "builtin_v1.jsonl"})

ROLES: Final = frozenset({"system", "developer", "user", "assistant"})
_FIELDS: Final = ("id", "category", "messages", "max_tokens", "temperature", "seed")
MAX_TEMPERATURE: Final = 2.0  # the OpenAI API's upper bound


def controls_for(category: str) -> Controls:
    """The category's controls, or `DEFAULT_CONTROLS` for a category without a row."""
    return CATEGORY_CONTROLS.get(category, DEFAULT_CONTROLS)


@dataclass(frozen=True, slots=True)
class BenchPrompt:
    """One benchmark request: chat messages plus the generation controls to send."""

    id: str
    category: str
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float
    seed: int | None

    def request_body(self, model: str) -> dict[str, Any]:
        """The `/v1/chat/completions` body for `model`; `seed` only when set."""
        body: dict[str, Any] = {
            "model": model,
            "messages": [dict(m) for m in self.messages],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        return body


@dataclass(frozen=True, slots=True)
class PromptSet:
    """A named, ordered collection of prompts. Order is the file's order."""

    name: str
    prompts: tuple[BenchPrompt, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def categories(self) -> tuple[str, ...]:
        """Categories in order of first appearance."""
        return tuple(dict.fromkeys(p.category for p in self.prompts))

    def subset(self, per_category: int) -> PromptSet:
        """The first `per_category` prompts of each category (all of a smaller one), in the
        set's order. Deterministic, so a CI run always sends the same prompts."""
        if per_category < 1:
            raise ValueError(f"per_category must be >= 1, got {per_category}")
        taken: dict[str, int] = {}
        kept: list[BenchPrompt] = []
        for p in self.prompts:
            n = taken.get(p.category, 0)
            if n < per_category:
                kept.append(p)
                taken[p.category] = n + 1
        return PromptSet(f"{self.name} (first {per_category} per category)", tuple(kept))


def load_prompt_set(spec: str) -> PromptSet:
    """`builtin:v1`, or the path of a JSONL file (module docstring for the format).

    Raises ValueError for an unknown `builtin:` name and for any bad line (naming it),
    and OSError (e.g. FileNotFoundError) when the file cannot be read.
    """
    if spec.startswith(BUILTIN_PREFIX):
        filename = BUILTIN_SETS.get(spec)
        if filename is None:
            known = ", ".join(sorted(BUILTIN_SETS))
            raise ValueError(f"unknown prompt set {spec!r}; built-in sets: {known}")
        data = resources.files("proxy.cli.bench.prompt_sets").joinpath(filename).read_bytes()
    else:
        data = Path(spec).expanduser().read_bytes()
    return parse_prompt_set(data, spec)


def parse_prompt_set(data: bytes | str, name: str) -> PromptSet:
    """Parse JSONL prompt-set text (bytes are read as UTF-8, an optional BOM allowed).
    Pure; `name` names the set and prefixes error messages."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line_no = data.count(b"\n", 0, exc.start) + 1
            raise ValueError(f"{name}: line {line_no}: not valid UTF-8") from exc
    else:
        text = data.removeprefix("\ufeff")
    return PromptSet(name, _parse_lines(text.split("\n"), name))


def _parse_lines(lines: Iterable[str], name: str) -> tuple[BenchPrompt, ...]:
    # Split on "\n" only: str.splitlines() would also split inside a JSON string that
    # holds a raw U+2028, which JSON allows.
    prompts: list[BenchPrompt] = []
    first_line_of: dict[str, int] = {}
    for line_no, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            prompt = _parse_line(line)
        except ValueError as exc:
            raise ValueError(f"{name}: line {line_no}: {exc}") from None
        if prompt.id in first_line_of:
            raise ValueError(
                f"{name}: line {line_no}: duplicate id {prompt.id!r} "
                f"(first on line {first_line_of[prompt.id]})"
            )
        first_line_of[prompt.id] = line_no
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{name}: no prompts")
    return tuple(prompts)


def _parse_line(line: str) -> BenchPrompt:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {_json_type(obj)}")
    unknown = sorted(set(obj) - set(_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(_FIELDS)}"
        )
    prompt_id = _required_str(obj, "id")
    category = _required_str(obj, "category")
    messages = _messages(obj.get("messages"))
    controls = controls_for(category)
    return BenchPrompt(
        id=prompt_id,
        category=category,
        messages=messages,
        max_tokens=_max_tokens(obj.get("max_tokens", controls.max_tokens)),
        temperature=_temperature(obj.get("temperature", controls.temperature)),
        seed=_seed(obj.get("seed", controls.seed)),
    )


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _required_str(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        got = "missing" if key not in obj else f"got {_json_type(value)}"
        raise ValueError(f"{key!r} must be a non-empty string ({got})")
    return value


def _messages(value: object) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError("'messages' must be a non-empty array of {role, content} objects")
    out: list[dict[str, str]] = []
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or set(msg) != {"role", "content"}:
            raise ValueError(f"{where} must be an object with exactly 'role' and 'content'")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise ValueError(f"{where}: role must be one of {', '.join(sorted(ROLES))}")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"{where}: content must be a non-empty string")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in out):
        raise ValueError("'messages' must contain a user message")
    return out


def _max_tokens(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"'max_tokens' must be an integer >= 1, got {value!r}")
    return value


def _temperature(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0.0 <= value <= MAX_TEMPERATURE
    ):
        raise ValueError(f"'temperature' must be a number in [0, {MAX_TEMPERATURE}], got {value!r}")
    return float(value)


def _seed(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"'seed' must be an integer or null, got {value!r}")
    return value
