"""The recorded streamed answers agree with each kind's `stream_usage`, and the proxy's
stream inspector finds their usage whatever the chunk ids (TGI's are all empty)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from backends.kinds import KINDS
from proxy.relay.sse import SseSplitter, StreamInspector, event_data
from tests.support.fakes.kind_servers import RECORDED

STREAMS = sorted(RECORDED.glob("*/*.sse"))


def chunks(raw: bytes) -> list[dict[str, object]]:
    out = []
    for event in SseSplitter().feed(raw):
        data = event_data(event)
        if data is not None and data != b"[DONE]":
            out.append(orjson.loads(data))
    return out


def test_every_kind_with_usage_in_streams_has_a_recorded_stream() -> None:
    recorded = {p.parent.name for p in STREAMS}
    assert recorded == {"vllm", "tgi", "llamacpp", "llama-cpp-python", "ollama"}


@pytest.mark.parametrize("path", STREAMS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_usage_in_recorded_streams_matches_the_kind(path: Path) -> None:
    kind = path.parent.name
    raw = path.read_bytes()
    has_usage = any(isinstance(c.get("usage"), dict) for c in chunks(raw))
    assert has_usage is KINDS[kind].stream_usage

    inspector = StreamInspector(client_wants_usage=False)
    kept = [inspector.process(e) for e in SseSplitter().feed(raw)]
    assert inspector.done and inspector.counted_tokens > 0
    assert (inspector.usage is not None) is has_usage
    for event, out in zip(SseSplitter().feed(raw), kept, strict=True):
        data = event_data(event)
        if data is None or data == b"[DONE]":
            continue
        chunk = orjson.loads(data)
        if chunk.get("choices"):
            # Every chunk with output reaches the client at once; the one that ends the
            # answer waits for the energy (below).
            assert (out is None) is any(c.get("finish_reason") for c in chunk["choices"])
        elif isinstance(chunk.get("usage"), dict):
            assert out is None  # the usage chunk the proxy asked for is kept back
    energy = {"joules": 1.5}
    sent = b"".join(k for k in kept if k is not None) + inspector.closing(energy, None, b"\n\n")
    datas = [event_data(e) for e in SseSplitter().feed(sent)]
    told = [orjson.loads(d) for d in datas if d is not None and d != b"[DONE]"]
    # What the client gets parses, every choice in the backend's order; the chunk that
    # ended the answer carries the energy, and so does the final one.
    assert [c["choices"] for c in told if c.get("choices")] == [
        c["choices"] for c in chunks(raw) if c.get("choices")
    ]
    ended = [c for c in told if any(ch.get("finish_reason") for ch in c.get("choices") or [])]
    assert len(ended) == 1 and ended[0]["energy"] == energy
    assert told[-1]["choices"] == [] and told[-1]["energy"] == energy


def test_tgi_chunks_have_empty_ids_and_usage_is_still_found() -> None:
    for name in ("stream_chat_usage.sse", "stream_chat_usage_v2.sse"):
        raw = (RECORDED / "tgi" / name).read_bytes()
        assert {c["id"] for c in chunks(raw)} == {""}
        inspector = StreamInspector(client_wants_usage=True)
        for event in SseSplitter().feed(raw):
            inspector.process(event)
        assert inspector.usage == {"prompt_tokens": 40, "completion_tokens": 3, "total_tokens": 43}
