"""A non-streamed answer: read in pieces, what the accounting needs read from it, and the
energy spliced in, with memory near the answer's own size.

Up to `LARGE_ANSWER_BYTES` the answer is parsed whole (its `usage`, the backend's
timings, an upstream proxy's `energy`). Above it, only its tail is read
(proxy/relay/json_tail.py) and the pieces are relayed as they were read: a 200 MB
embeddings answer costs its 200 MB and a 64 KiB tail, not a parse several times its
size that stalls every other request while it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.relay.json_tail import (
    LARGE_ANSWER_BYTES,
    TAIL_BYTES,
    TailMembers,
    add_members_to_object,
    replace_last_member,
    splice_into_usage,
    top_members,
)
from proxy.relay.upstream import UpstreamResponse

# The answer is kept in pieces of about this size (the backend's reads joined): few
# messages to send, no copy of the whole.
PIECE_BYTES = 1 << 20


async def read_pieces(resp: UpstreamResponse) -> list[bytes]:
    """The answer's body in pieces of about PIECE_BYTES, none joined into a whole."""
    pieces: list[bytes] = []
    small: list[bytes] = []
    size = 0
    while chunk := await resp.next_chunk():
        small.append(chunk)
        size += len(chunk)
        if size >= PIECE_BYTES:
            pieces.append(small[0] if len(small) == 1 else b"".join(small))
            small, size = [], 0
    if small:
        pieces.append(b"".join(small))
    return pieces


@dataclass(slots=True)
class WholeAnswer:
    """An answer as read: its pieces, and its top-level members the accounting reads
    (all of them when it was parsed whole, those in its tail when it was too large)."""

    pieces: list[bytes]
    fields: dict[str, Any] = field(default_factory=dict)
    doc: dict[str, Any] | None = None  # the parse, when whole
    tail: TailMembers | None = None  # the tail's members, when too large to parse

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.pieces)


def read_answer(pieces: list[bytes], is_json: bool) -> WholeAnswer:
    """What the accounting needs of an answer: parsed whole up to LARGE_ANSWER_BYTES,
    read at its tail above."""
    answer = WholeAnswer(pieces)
    if not is_json or not pieces:
        return answer
    if answer.size <= LARGE_ANSWER_BYTES:
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        answer.pieces = [data]
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            return answer
        if isinstance(doc, dict):
            answer.doc = answer.fields = doc
        return answer
    _split_tail(answer)
    answer.tail = top_members(answer.pieces[-1])
    answer.fields = answer.tail.values
    return answer


def _split_tail(answer: WholeAnswer) -> None:
    """Make the last piece exactly the answer's last TAIL_BYTES (or all of a shorter one)."""
    pieces = answer.pieces
    last: list[bytes] = []
    size = 0
    while pieces and size < TAIL_BYTES:
        piece = pieces.pop()
        last.insert(0, piece)
        size += len(piece)
    joined = last[0] if len(last) == 1 else b"".join(last)
    if len(joined) > TAIL_BYTES:
        pieces.append(joined[:-TAIL_BYTES])
        joined = joined[-TAIL_BYTES:]
    pieces.append(joined)


def usage_figures(energy: dict[str, Any]) -> dict[str, int]:
    """What goes into an answer's `usage` beside its tokens: the energy and the emissions
    as whole numbers (millijoules, micrograms CO2eq). Integers, as the token counts are:
    client libraries that add the `usage` of several answers (LangChain's batches) add
    these too, and one that meets a float or an object there warns or fails."""
    out: dict[str, int] = {}
    for key, name, scale in (
        ("joules", "energy_millijoules", 1e3),
        ("co2eq_g", "co2eq_micrograms", 1e6),
    ):
        value = energy.get(key)
        if isinstance(value, int | float) and math.isfinite(value * scale):
            out[name] = round(value * scale)
    return out


def with_energy(answer: WholeAnswer, energy: dict[str, Any]) -> list[bytes]:
    """The answer's pieces with this proxy's `energy` as the last member of its
    top-level object, and its figures in the `usage` object where it has one (client
    libraries that keep only an answer's `usage`, as LangChain's `response_metadata
    ["token_usage"]`, keep them with it: `usage_figures`): an upstream proxy's own
    replaced, never a second key of the same name. A large answer whose tail showed no
    top-level member is relayed as it came (its energy is in the headers)."""
    pieces = answer.pieces
    encoded = orjson.dumps(energy)
    figures = usage_figures(energy)
    if answer.doc is not None:
        doc, data = answer.doc, pieces[0]
        usage = doc.get("usage")
        upstream = isinstance(usage, dict) and bool(figures.keys() & usage.keys())
        if "energy" in doc or upstream:
            # The backend's own (another energy-proxy in front of it): replaced by this
            # proxy's, never a second key of the same name.
            doc["energy"] = energy
            if isinstance(usage, dict):
                usage.update(figures)
            return [orjson.dumps(doc)]
        if doc and data.rstrip().endswith(b"}"):
            # Spliced in without encoding the backend's document again.
            if isinstance(usage, dict) and figures:
                spliced = splice_into_usage(data, usage, figures)
                if spliced is None:  # not found as parsed: encoded again, to be sure
                    usage.update(figures)
                    doc["energy"] = energy
                    return [orjson.dumps(doc)]
                data = spliced
            return [data.rstrip()[:-1] + b',"energy":' + encoded + b"}"]
        return pieces
    if answer.tail is not None and answer.tail.values:
        tail = pieces[-1]
        with_usage = add_members_to_object(tail, answer.tail, "usage", figures) if figures else None
        if with_usage is not None:
            tail = with_usage
            answer.tail = top_members(tail)
        return [*pieces[:-1], replace_last_member(tail, answer.tail, "energy", encoded)]
    return pieces
