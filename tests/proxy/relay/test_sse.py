"""The SSE relay's pure parts: splitting, usage handling, counting output tokens."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.relay.sse import SseSplitter, StreamInspector, energy_event, event_data


def chunk(delta: dict[str, object] | None = None, **extra: object) -> bytes:
    d: dict[str, object] = {"id": "c1", "object": "chat.completion.chunk", "created": 1}
    d["choices"] = [] if delta is None else [{"index": 0, "delta": delta}]
    d.update(extra)
    return b"data: " + json.dumps(d).encode() + b"\n\n"


def reference_split(stream: bytes) -> tuple[list[bytes], bytes]:
    """Events of a whole stream at once: everything up to each blank line (any line ending)."""
    events, pos = [], 0
    for m in re.finditer(rb"\r\n\r\n|\n\n|\r\r", stream):
        events.append(stream[pos : m.end()])
        pos = m.end()
    return events, stream[pos:]


@given(
    st.lists(st.sampled_from([b"data: x", b"\n", b"\r", b"\r\n", b"yz", b"{}"]), max_size=40),
    st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_splitter_matches_a_whole_stream_split_however_it_is_cut(
    parts: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(parts)
    bounds = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    sp = SseSplitter()
    got: list[bytes] = []
    for a, b in itertools.pairwise(bounds):
        got += sp.feed(stream[a:b])
    assert (got, sp.rest()) == reference_split(stream)


def test_splitter_handles_any_cut_and_line_ending() -> None:
    stream = b"data: a\n\ndata: b\r\n\r\n: ping\n\ndata: c\n\n"
    for cut in range(1, len(stream)):
        sp = SseSplitter()
        events = sp.feed(stream[:cut]) + sp.feed(stream[cut:])
        assert events == [b"data: a\n\n", b"data: b\r\n\r\n", b": ping\n\n", b"data: c\n\n"]
        assert sp.rest() == b""
    sp = SseSplitter()
    assert sp.feed(b"data: x\r\n\r\n") == [b"data: x\r\n\r\n"] and sp.separator == b"\r\n\r\n"
    assert sp.feed(b"data: partial") == [] and sp.rest() == b"data: partial"


def test_event_data_single_and_multi_line() -> None:
    assert event_data(b"data: {}\n\n") == b"{}"
    assert event_data(b"data:{}\r\n\r\n") == b"{}"
    assert event_data(b"event: x\ndata: a\ndata: b\n\n") == b"a\nb"
    assert event_data(b": comment\n\n") is None


@pytest.mark.parametrize(
    ("event", "tokens"),
    [
        (chunk({"role": "assistant"}), 0),
        (chunk({"role": "assistant", "content": ""}), 0),
        (chunk({"content": None}), 0),
        (chunk({"content": "Hi"}), 1),
        (b'data: {"id":"c","choices":[{"index":0,"delta":{"content": "x"}}]}\n\n', 1),
        (chunk({"content": 'say "content": "x" here'}), 1),  # quotes in text are escaped
        (chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a'}}]}), 1),
        (b'data: {"id":"t","object":"text_completion","choices":[{"text":"yo"}]}\n\n', 1),
        (chunk({}, logprobs={"content": [{"token": "a"}]}), 0),
    ],
)
def test_output_tokens_counted(event: bytes, tokens: int) -> None:
    insp = StreamInspector(client_wants_usage=False)
    insp.process(event)
    assert insp.counted_tokens == tokens


def test_usage_chunk_kept_back_unless_asked_and_null_usage_stripped() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    hidden = StreamInspector(client_wants_usage=False)
    first = hidden.process(chunk({"content": "a"}, usage=None))
    assert first is not None and b'"usage"' not in first
    assert hidden.template == {"id": "c1", "object": "chat.completion.chunk", "created": 1}
    assert hidden.process(chunk(None, usage=usage)) is None
    assert hidden.usage == usage
    assert hidden.process(b"data: [DONE]\n\n") is None and hidden.done
    shown = StreamInspector(client_wants_usage=True)
    assert shown.process(chunk(None, usage=usage)) is not None
    # a usage object on a chunk that also has choices (llama.cpp's server) is forwarded
    both = StreamInspector(client_wants_usage=False)
    ev = chunk({"content": "z"}, usage=usage)
    assert both.process(ev) == ev and both.usage == usage and both.counted_tokens == 1


def test_energy_event_shape() -> None:
    ev = energy_event({"id": "c1", "model": "m"}, {"joules": 1.5}, b"\r\n\r\n")
    assert ev.endswith(b"\r\n\r\n")
    payload = json.loads(ev[6:])
    assert payload == {"id": "c1", "model": "m", "choices": [], "energy": {"joules": 1.5}}
