"""The prompt's text and size estimate for every metered API's body shape. Pure."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metering.accounting.prompt_text import (
    CHARS_PER_TOKEN,
    PROMPT_FIELDS,
    _paired_extra_chars,
    _texts,
    prompt_text,
    prompt_tokens_estimate,
)

Q = "q" * 40  # 10 tokens at 4 characters a token
D = "d" * 400  # 100 tokens

# Each body, with the text pieces its backend reads (each once).
SHAPES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "chat": ({"messages": [{"role": "user", "content": [{"type": "text", "text": D}]}]}, [D]),
    "completions": ({"prompt": [D, Q]}, [D, Q]),
    "embeddings": ({"input": [D, D]}, [D, D]),
    "pooling": ({"input": D}, [D]),
    "cohere embed": ({"texts": [D, Q], "input_type": "search_document"}, [D, Q]),
    "responses, a string": ({"instructions": Q, "input": D}, [Q, D]),
    "responses, items": (
        {
            "instructions": Q,
            "input": [
                {"role": "user", "content": D},
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": D},
                        {"type": "input_image", "image_url": "data:..."},
                    ],
                },
                {"type": "function_call_output", "call_id": "c1", "output": Q},
            ],
        },
        [Q, D, D, Q],
    ),
    "anthropic messages": (
        {
            "system": [{"type": "text", "text": Q}],
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": D},
                        {"type": "image", "source": {"data": "..."}},
                    ],
                },
                {"role": "assistant", "content": Q},
            ],
            "max_tokens": 16,
        },
        [Q, D, Q],
    ),
    "anthropic, a system string": (
        {"system": Q, "messages": [{"role": "user", "content": D}]},
        [Q, D],
    ),
    "rerank, strings": ({"query": Q, "documents": [D, D, D]}, [Q, D, D, D]),
    "rerank, objects": ({"query": Q, "documents": [{"text": D}, {"text": D}]}, [Q, D, D]),
    "score, one against many": ({"text_1": Q, "text_2": [D, D]}, [Q, D, D]),
    "score, pairs": ({"text_1": [Q, Q], "text_2": [D, D]}, [Q, Q, D, D]),
    "score, queries": ({"queries": Q, "documents": [D, D]}, [Q, D, D]),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_the_text_is_every_piece_once(name: str) -> None:
    payload, pieces = SHAPES[name]
    assert prompt_text(payload) == "\n".join(pieces)


@pytest.mark.parametrize(
    ("name", "tokens"),
    [
        ("chat", 100.0),
        ("embeddings", 200.0),
        ("cohere embed", 110.0),
        ("responses, a string", 110.0),
        ("responses, items", 220.0),
        ("anthropic messages", 120.0),
        # A cross-encoder reads the query beside each document: once per pair.
        ("rerank, strings", 3 * (10.0 + 100.0)),
        ("rerank, objects", 2 * (10.0 + 100.0)),
        ("score, one against many", 2 * (10.0 + 100.0)),
        ("score, pairs", 2 * (10.0 + 100.0)),  # paired one to one: nothing repeats
        ("score, queries", 2 * (10.0 + 100.0)),
    ],
)
def test_the_estimate_counts_what_the_backend_reads(name: str, tokens: float) -> None:
    assert prompt_tokens_estimate(SHAPES[name][0]) == pytest.approx(tokens)


def test_a_query_in_a_list_of_one_is_broadcast() -> None:
    assert prompt_tokens_estimate({"text_1": [Q], "text_2": [D, D, D]}) == pytest.approx(330.0)


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"input": [[1, 2, 3]]},  # token ids carry no text
        {"query": "", "documents": []},
        {"query": None, "documents": [{"image_url": "data:..."}]},
    ],
)
def test_bodies_without_text_weigh_at_least_one_token(payload: dict[str, Any]) -> None:
    assert prompt_tokens_estimate(payload) == 1.0


def test_the_estimate_is_the_characters_over_four() -> None:
    assert CHARS_PER_TOKEN == 4.0
    assert prompt_tokens_estimate({"input": "x" * 4000}) == 1000.0


# Any JSON value a client may send in a prompt field: the estimate's counting loop must
# count exactly the characters of the pieces `prompt_text` joins.
_piece_keys = st.sampled_from(["text", "content", "output", "role", "type"])
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(_piece_keys, children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(PROMPT_FIELDS), _json_values, max_size=4))
def test_the_estimate_counts_exactly_the_text_pieces(payload: dict[str, Any]) -> None:
    pieces = [t for key in PROMPT_FIELDS for t in _texts(payload.get(key))]
    expected = sum(len(t) for t in pieces) + _paired_extra_chars(payload)
    assert prompt_tokens_estimate(payload) == max(1.0, expected / CHARS_PER_TOKEN)
