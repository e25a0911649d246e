"""The SSE relay's pure parts: splitting, usage handling, counting output tokens."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.relay.sse import (
    SseSplitter,
    StreamInspector,
    energy_event,
    event_data,
    relay_pieces,
    with_energy,
)


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


def finish(content: str = "", index: int = 0, sep: bytes = b"\n\n") -> bytes:
    choice = {"index": index, "delta": {"content": content}, "finish_reason": "stop"}
    d = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "choices": [choice]}
    return b"data: " + json.dumps(d).encode() + sep


def run(inspector: StreamInspector, events: list[bytes], energy: dict[str, object]) -> bytes:
    """What the client gets: each event's forward, then the closing."""
    out = b"".join(b for b in map(inspector.process, events) if b is not None)
    return out + inspector.closing(energy, None, b"\n\n")


@pytest.mark.parametrize("wants_usage", [True, False])
@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n"])
def test_the_finish_chunk_waits_for_the_end_and_carries_the_energy(
    wants_usage: bool, sep: bytes
) -> None:
    energy = {"joules": 2.5, "request_id": "req-1"}
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    inspector = StreamInspector(client_wants_usage=wants_usage)
    end = finish("!", sep=sep)
    assert inspector.process(chunk({"content": "a"})) is not None  # output goes at once
    assert inspector.process(end) is None  # waits: the energy is not known yet
    assert inspector.process(chunk(None, usage=usage)) is None  # after it, in order
    assert inspector.process(b": keep-alive\n\n") is None
    assert inspector.process(b"data: [DONE]\n\n") is None
    last = inspector.closing(energy, None, sep)
    events = [e for e in re.split(rb"\r\n\r\n|\n\n", last) if e]
    first = json.loads(event_data(events[0] + sep) or b"")
    # The backend's chunk, its bytes kept, the energy added last.
    assert (
        events[0] + sep
        == end[: end.rindex(b"}")]
        + b',"energy":'
        + json.dumps(energy, separators=(",", ":")).encode()
        + end[end.rindex(b"}") :]
    )
    assert first["choices"][0]["finish_reason"] == "stop" and first["energy"] == energy
    # Then the usage chunk (if asked), the comment, the energy event and [DONE].
    assert (b'"usage"' in events[1]) is wants_usage
    assert events[-3] == b": keep-alive"
    assert json.loads(event_data(events[-2] + sep) or b"")["energy"] == energy
    assert events[-1] == b"data: [DONE]"


def test_output_after_a_finish_sends_it_on_without_the_energy() -> None:
    # n = 2: the first choice ends while the second still writes.
    inspector = StreamInspector(client_wants_usage=False)
    first_end = finish("x", index=0)
    assert inspector.process(first_end) is None
    more = chunk({"content": "y"})
    assert inspector.process(more) == first_end + more  # in order, as it came
    second_end = finish("z", index=1)
    assert inspector.process(second_end) is None  # the last to end carries it
    out = inspector.closing({"joules": 1.0}, None, b"\n\n")
    assert out.startswith(second_end[: second_end.rindex(b"}")] + b',"energy":{"joules":1.0}}')


def test_what_waits_after_a_finish_is_bounded() -> None:
    inspector = StreamInspector(client_wants_usage=True)
    end = finish()
    assert inspector.process(end) is None
    comment = b": " + b"p" * 40_000 + b"\n\n"
    assert inspector.process(comment) is None
    sent = inspector.process(comment)  # past MAX_HELD_BYTES: sent on, as it came
    assert sent == end + comment + comment
    assert inspector.closing({"joules": 1.0}, None, b"\n\n").startswith(b"data: {")


def test_a_stream_without_a_finish_chunk_is_relayed_as_before() -> None:
    inspector = StreamInspector(client_wants_usage=False)
    events = [chunk({"content": "a"}), chunk({"content": "b"}), b"data: [DONE]\n\n"]
    out = run(inspector, events, {"joules": 1.0})
    assert out.startswith(events[0] + events[1])
    assert out.count(b'"energy"') == 1 and out.endswith(b"data: [DONE]\n\n")


def test_a_piece_of_an_event_given_up_comes_after_what_waited() -> None:
    inspector = StreamInspector(client_wants_usage=False)
    end = finish("x")
    assert inspector.process(end) is None
    piece = memoryview(b"data: " + b"y" * 100)
    out = relay_pieces([piece], inspector.process, inspector.release)
    assert out == end + bytes(piece)  # in order; the energy then only on the final chunk
    assert inspector.release() == b""


def test_an_empty_or_null_finish_reason_does_not_wait() -> None:
    inspector = StreamInspector(client_wants_usage=False)
    for reason in ("", None):
        d = {
            "id": "c1",
            "choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": reason}],
        }
        ev = b"data: " + json.dumps(d).encode() + b"\n\n"
        assert inspector.process(ev) == ev


def test_the_energy_goes_only_into_one_data_line_and_replaces_an_upstream_s() -> None:
    energy = {"joules": 2.0}
    with_comment = b'data: {"a":1}\n: x}\n\n'
    assert with_energy(with_comment, energy) == with_comment  # not into the comment
    two_lines = b'data: {"a":\ndata: 1}\n\n'
    assert with_energy(two_lines, energy) == two_lines
    upstream = b'data: {"a":1,"energy":{"joules":9.0}}\r\n\r\n'
    spliced = with_energy(upstream, energy)
    assert spliced.endswith(b"\r\n\r\n") and spliced.count(b'"energy"') == 1
    assert json.loads(spliced[6:]) == {"a": 1, "energy": energy}
    plain = b'data:{"a":1}\n\n'  # no space after the colon
    assert json.loads(with_energy(plain, energy)[5:]) == {"a": 1, "energy": energy}
