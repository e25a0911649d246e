"""A non-streamed answer: read in pieces, what the accounting needs read from it, and the
energy spliced in, with memory near the answer's own size.

Up to `LARGE_ANSWER_BYTES` the answer is parsed whole (its `usage`, the backend's
timings, an upstream proxy's `energy`). Above it, only its tail is read
(proxy/relay/json_tail.py) and the pieces are relayed as they were read: a 200 MB
embeddings answer costs its 200 MB and a 64 KiB tail, not a parse several times its
size that stalls every other request while it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.relay.json_tail import (
    LARGE_ANSWER_BYTES,
    TAIL_BYTES,
    TailMembers,
    replace_last_member,
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


def with_energy(answer: WholeAnswer, energy: dict[str, Any]) -> list[bytes]:
    """The answer's pieces with this proxy's `energy` as a member of its top-level
    object: an upstream proxy's own replaced, never a second key of the same name. A
    large answer whose tail showed no top-level member is relayed as it came (its energy
    is in the headers)."""
    pieces = answer.pieces
    encoded = orjson.dumps(energy)
    if answer.doc is not None:
        data = pieces[0]
        if "energy" in answer.doc:
            answer.doc["energy"] = energy
            return [orjson.dumps(answer.doc)]
        if answer.doc and data.rstrip().endswith(b"}"):
            # Spliced in without encoding the backend's document again.
            return [data.rstrip()[:-1] + b',"energy":' + encoded + b"}"]
        return pieces
    if answer.tail is not None and answer.tail.values:
        return [*pieces[:-1], replace_last_member(pieces[-1], answer.tail, "energy", encoded)]
    return pieces
