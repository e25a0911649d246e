"""The Responses and Messages stream inspectors, bytes in and bytes out."""

from __future__ import annotations

import json
from typing import Any

from proxy.relay.typed_sse import MessagesInspector, ResponsesInspector

SEP = b"\n\n"
ENERGY = {"joules": 1.5, "endpoint": "responses"}


def ev(kind: str, data: dict[str, Any], sep: bytes = SEP) -> bytes:
    line_end = sep[: len(sep) // 2]
    return b"event: " + kind.encode() + line_end + b"data: " + json.dumps(data).encode() + sep


def parse(event: bytes) -> tuple[str, dict[str, Any]]:
    lines = event.strip().splitlines()
    assert lines[0].startswith(b"event: ") and lines[1].startswith(b"data: ")
    return lines[0][7:].decode(), json.loads(lines[1][6:])


def test_responses_deltas_counted_and_completed_held_then_carries_energy() -> None:
    insp = ResponsesInspector()
    created = ev("response.created", {"type": "response.created", "response": {"id": "r"}})
    assert insp.process(created) == created
    for text in ("Hel", "lo"):
        delta = ev("response.output_text.delta", {"type": "response.output_text.delta",
                                                   "delta": text})  # fmt: skip
        assert insp.process(delta) == delta
    usage = {"input_tokens": 7, "output_tokens": 2, "total_tokens": 9}
    done = ev("response.completed", {"type": "response.completed", "sequence_number": 5,
                                     "response": {"id": "r", "usage": usage}})  # fmt: skip
    assert insp.process(done) is None  # held until the energy is known
    assert insp.counted_tokens == 2 and insp.usage == usage
    kind, data = parse(insp.closing(ENERGY, None, SEP))
    assert kind == "response.completed"
    assert data["response"]["energy"] == ENERGY and data["response"]["usage"] == usage
    assert data["sequence_number"] == 5


def test_responses_stream_cut_short_ends_with_an_error_event_carrying_energy() -> None:
    insp = ResponsesInspector()
    insp.process(ev("response.created", {"type": "response.created", "response": {}}))
    kind, data = parse(insp.closing(ENERGY, None, SEP))
    assert kind == "error" and data["type"] == "error" and data["energy"] == ENERGY
    failure = {"message": "backend died", "type": "upstream_error", "code": "backend_unreachable"}
    kind, data = parse(insp.closing(ENERGY, failure, b"\r\n\r\n"))
    assert kind == "error" and data["message"] == "backend died"


def test_messages_usage_from_start_and_delta_and_energy_in_delta() -> None:
    insp = MessagesInspector()
    start = ev("message_start", {"type": "message_start", "message": {
        "id": "m", "usage": {"input_tokens": 11, "output_tokens": 1}}})  # fmt: skip
    assert insp.process(start) == start
    block = ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": "hi"}})  # fmt: skip
    assert insp.process(block) == block
    delta = ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                 "usage": {"output_tokens": 4}})  # fmt: skip
    stop = ev("message_stop", {"type": "message_stop"})
    assert insp.process(delta) is None and insp.process(stop) is None
    assert insp.usage == {"input_tokens": 11, "output_tokens": 4}
    assert insp.counted_tokens == 1
    out = insp.closing(ENERGY, None, SEP)
    first, second = out.split(SEP)[0] + SEP, out.split(SEP)[1] + SEP
    kind, data = parse(first)
    assert kind == "message_delta" and data["energy"] == ENERGY
    assert data["usage"] == {"output_tokens": 4}  # the backend's usage left as it was
    assert second == stop  # message_stop byte for byte, after it


def test_messages_failure_is_an_anthropic_error_event() -> None:
    insp = MessagesInspector()
    failure = {"message": "timeout", "type": "upstream_error", "code": "backend_timeout"}
    kind, data = parse(insp.closing(ENERGY, failure, SEP))
    assert kind == "error"
    assert data["error"] == {"type": "api_error", "message": "timeout"}
    assert data["energy"] == ENERGY


def test_crlf_events_keep_their_line_endings() -> None:
    insp = ResponsesInspector()
    crlf = b"\r\n\r\n"
    insp.process(ev("response.completed", {"type": "response.completed",
                                           "response": {"usage": {}}}, crlf))  # fmt: skip
    out = insp.closing(ENERGY, None, crlf)
    assert out.startswith(b"event: response.completed\r\ndata: ") and out.endswith(crlf)
