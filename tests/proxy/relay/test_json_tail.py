"""The top-level members of a large JSON answer read from its tail alone. Pure."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from proxy.relay.json_tail import (
    TAIL_BYTES,
    add_members_to_object,
    replace_last_member,
    splice_into_usage,
    top_members,
)


def _item(i: int) -> dict[str, Any]:
    return {"object": "embedding", "index": i, "usage": {"n": -1}, "embedding": [0.25] * 8}


def _answer(extra: dict[str, Any], items: int = 4000, ascii_only: bool = True) -> bytes:
    doc: dict[str, Any] = {
        "object": "list",
        "data": [_item(i) for i in range(items)],
        "model": "m",
        **extra,
    }
    return json.dumps(doc, ensure_ascii=ascii_only).encode()


@pytest.mark.parametrize("separators", [(",", ":"), (", ", ": ")])
def test_the_top_level_usage_is_found_not_one_nested_in_the_data(
    separators: tuple[str, str],
) -> None:
    doc = {
        "data": [{"usage": {"prompt_tokens": -1}, "v": [1] * 50} for _ in range(3000)],
        "usage": {"prompt_tokens": 7, "total_tokens": 7},
        "metrics": {"queue_time_ms": 3},
    }
    data = json.dumps(doc, separators=separators).encode() + b"\n"
    found = top_members(data[-TAIL_BYTES:])
    assert found.values["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert found.values["metrics"] == {"queue_time_ms": 3}
    assert "data" not in found.values  # it starts before the tail


def test_an_upstream_energy_is_replaced_and_ours_is_the_last_member() -> None:
    data = _answer({"usage": {"prompt_tokens": 3}, "energy": {"joules": 1.0}, "after": [1, 2]})
    tail = data[-TAIL_BYTES:]
    found = top_members(tail)
    new = data[:-TAIL_BYTES] + replace_last_member(tail, found, "energy", b'{"joules":9.5}')
    doc = orjson.loads(new)
    assert doc["energy"] == {"joules": 9.5}
    assert list(doc)[-2:] == ["after", "energy"]
    assert new.count(b'"energy"') == 1
    assert len(doc["data"]) == 4000


def test_a_tail_cut_inside_multibyte_text_still_reads() -> None:
    data = _answer({"text": "é" * 40_000, "usage": {"prompt_tokens": 5}}, ascii_only=False)
    for cut in (TAIL_BYTES, TAIL_BYTES - 1, 1001):
        found = top_members(data[-cut:])
        assert found.values.get("usage") == {"prompt_tokens": 5}


@pytest.mark.parametrize(
    "tail",
    [b"", b"not json", b"[1, 2, 3]", b'"a string"', b'{"open": [1, 2', b'1, "usage": {}}x'],
)
def test_what_does_not_end_an_object_gives_nothing(tail: bytes) -> None:
    assert top_members(tail).values == {}


def test_a_member_inside_a_string_is_not_taken() -> None:
    # Inside a string a quote is escaped: `,"usage":` cannot start a member there.
    text = json.dumps({"data": "x" * 100, "note": 'say ,"usage": {"prompt_tokens": 9}}'})
    found = top_members(text.encode())
    assert "usage" not in found.values
    assert found.values["note"].startswith("say")


def test_a_tail_of_many_small_members_still_finds_the_usage() -> None:
    # Logprobs: thousands of tiny objects in the tail, each a candidate; compact.
    logprobs = [{"token": ",", "logprob": -0.5, "bytes": [44]} for _ in range(20_000)]
    doc = {"choices": [{"logprobs": {"content": logprobs}}],
           "usage": {"prompt_tokens": 3, "completion_tokens": 20_000}}  # fmt: skip
    data = json.dumps(doc, separators=(",", ":")).encode()
    found = top_members(data[-TAIL_BYTES:])
    assert found.values["usage"] == {"prompt_tokens": 3, "completion_tokens": 20_000}


def test_nesting_deeper_than_python_can_parse_is_not_an_error() -> None:
    deep = "[" * 5000 + "]" * 5000
    tail = ('{"a":' + deep + ',"usage":{"prompt_tokens":1}}').encode()
    assert top_members(tail).values.get("usage") == {"prompt_tokens": 1}
    assert top_members(('{"x":1,"b":' + deep + "}").encode()).values.get("x") is None


@pytest.mark.parametrize(
    "doc",
    [
        {"id": "x", "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
        {"usage": {"prompt_tokens": 3}, "system_fingerprint": "fp"},  # usage not last
        {"choices": [{"text": 'say "usage": {"a": 1}'}], "usage": {"n": 1}},  # a decoy
        {"note": "é" * 50, "usage": {"prompt_tokens": 1, "details": {"cached": 0}}},
        {"usage": {}},
    ],
)
def test_the_energy_goes_into_usage_and_the_rest_is_the_backends_bytes(
    doc: dict[str, Any],
) -> None:
    data = json.dumps(doc, ensure_ascii=False).encode()
    out = splice_into_usage(data, doc["usage"], {"energy_millijoules": 2500})
    assert out is not None
    back = orjson.loads(out)
    assert back["usage"] == {**doc["usage"], "energy_millijoules": 2500}
    assert {k: v for k, v in back.items() if k != "usage"} == {
        k: v for k, v in doc.items() if k != "usage"
    }
    assert (
        out.replace(b',"energy_millijoules":2500', b"") == data
        or out.replace(b'"energy_millijoules":2500', b"") == data
    )


def test_a_usage_that_is_not_the_one_parsed_is_left_to_the_caller() -> None:
    data = b'{"usage": {"prompt_tokens": 1}, "x": "\\"usage\\": 5"}'
    assert splice_into_usage(data, {"prompt_tokens": 2}, {"a": 1}) is None


@pytest.mark.parametrize(
    "extra", [{"metadata": {"usage": {"prompt_tokens": 1}}}, {"system_fingerprint": "usage"}]
)
def test_an_echoed_usage_elsewhere_is_left_to_a_parse(extra: dict[str, Any]) -> None:
    usage = {"prompt_tokens": 1}
    data = json.dumps({"usage": usage, **extra}).encode()
    assert splice_into_usage(data, usage, {"energy_millijoules": 5}) is None


def test_usage_figures_of_an_upstream_proxy_in_a_large_tail_are_replaced() -> None:
    doc = {
        "data": [[0.5] * 50] * 2000,
        "usage": {"prompt_tokens": 2, "energy_millijoules": 999},
        "energy": {"joules": 9},
    }
    data = json.dumps(doc, separators=(",", ":")).encode()
    tail = data[-TAIL_BYTES:]
    found = top_members(tail)
    new_tail = add_members_to_object(tail, found, "usage", {"energy_millijoules": 1234})
    assert new_tail is not None
    back = orjson.loads(data[:-TAIL_BYTES] + new_tail)
    assert back["usage"] == {"prompt_tokens": 2, "energy_millijoules": 1234}
