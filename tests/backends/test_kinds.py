"""The per-kind facts and the pure readers of their answers."""

from __future__ import annotations

import pytest

from backends.kinds import (
    AUTO,
    KIND_NAMES,
    KINDS,
    kind_named,
    ollama_tags_models,
    openai_models,
    token_count,
)
from tests.support.fakes.kind_servers import TOKENS, recorded_json


def test_kind_names_are_the_readyz_values() -> None:
    assert KIND_NAMES == ("vllm", "tgi", "llamacpp", "llama-cpp-python", "ollama", "openai")
    assert tuple(KINDS) == KIND_NAMES
    assert AUTO not in KINDS
    with pytest.raises(ValueError, match="one of: auto, vllm, tgi"):
        kind_named(AUTO)  # "auto" is a setting, not a kind


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("vllm", "tokenize.json"),
        ("tgi", "tokenize.json"),
        ("llamacpp", "tokenize.json"),
        ("llama-cpp-python", "tokenize.json"),
        ("llama-cpp-python", "tokenize_count.json"),
    ],
)
def test_token_count_reads_every_recorded_tokenize_answer(kind: str, name: str) -> None:
    assert token_count(recorded_json(kind, name)) == TOKENS[kind]


@pytest.mark.parametrize(
    "doc",
    [None, "5", {"count": "5"}, {"count": True}, {"count": -1}, {"tokens": "abc"}, {}],
)
def test_token_count_of_other_answers(doc: object) -> None:
    assert token_count(doc) is None


def test_tokenizer_bodies() -> None:
    bodies = {
        k: (spec.tokenizer.path, spec.tokenizer.body("m", "t")) if spec.tokenizer else None
        for k, spec in KINDS.items()
    }
    assert bodies == {
        "vllm": ("/tokenize", {"model": "m", "prompt": "t"}),
        "tgi": ("/tokenize", {"inputs": "t"}),
        "llamacpp": ("/tokenize", {"content": "t"}),
        "llama-cpp-python": ("/extras/tokenize", {"input": "t", "model": "m"}),
        "ollama": None,
        "openai": None,
    }


def test_openai_models_keeps_entries_with_an_id() -> None:
    doc = {"object": "list", "data": [{"id": "a"}, {"name": "b"}, "c", {"id": 3}]}
    assert openai_models(doc) == [{"id": "a"}]
    assert openai_models({"data": {}}) is None
    assert openai_models([]) is None


def test_ollama_tags_as_openai_entries() -> None:
    assert ollama_tags_models(recorded_json("ollama", "tags.json")) == [
        {"id": "llama3.2:latest", "object": "model", "owned_by": "library"},
        {"id": "all-minilm:latest", "object": "model", "owned_by": "library"},
    ]
    doc = {"models": [{"name": "mattw/pygmalion:latest"}, {"model": "no-name"}]}
    assert ollama_tags_models(doc) == [
        {"id": "mattw/pygmalion:latest", "object": "model", "owned_by": "mattw"}
    ]
    assert ollama_tags_models({"models": None}) is None


@pytest.mark.parametrize(
    ("kind", "answer", "healthy"),
    [
        ("vllm", "", True),
        ("tgi", "", True),
        ("llamacpp", recorded_json("llamacpp", "health.json"), True),
        ("llamacpp", recorded_json("llamacpp", "health_loading.json"), False),
        ("ollama", recorded_json("ollama", "version.json"), True),
        ("ollama", {"error": "x"}, False),
    ],
)
def test_health_answers(kind: str, answer: object, healthy: bool) -> None:
    check = KINDS[kind].health
    assert check is not None
    assert (check.problem(answer) is None) is healthy
