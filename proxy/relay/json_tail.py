"""The last top-level members of a large JSON answer, read from its tail alone. Pure.

A non-streamed answer above `LARGE_ANSWER_BYTES` (an embeddings batch of a few thousand
inputs is hundreds of megabytes) is not parsed whole: its Python objects take several
times its bytes and the parse stalls the event loop. What the proxy needs of it (`usage`,
the backend's `metrics`/`timings`, an upstream proxy's `energy`) is at the end of every
OpenAI-shaped answer, so only the last `TAIL_BYTES` are read.

A member is known to be the top-level object's when, parsed from its start, it is
followed by members only up to the document's closing brace. A candidate start is a
comma or brace followed by a quote; most are members of nested objects (or, rarely, a
string's last comma before its closing quote), and the chain to the end tells them
apart. Candidates are tried from the end: the last top-level member is found first
(`usage` is among the last), and each one before it must end where the next begins.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

LARGE_ANSWER_BYTES = 8 * 1024 * 1024
TAIL_BYTES = 64 * 1024
# Candidates tried at most: a tail of small nested objects has many; each fails fast.
MAX_CANDIDATES = 4096

_MEMBER_START = re.compile(r'[,{]\s*"')
_MEMBER_START_BYTES = re.compile(rb'[,{]\s*"')
_KEY = re.compile(r'"((?:[^"\\]|\\.)*)"\s*:\s*')
_DECODER = json.JSONDecoder()


@dataclass(slots=True)
class TailMembers:
    """The top-level members found in a tail: name -> value, and where each starts (the
    offset in the tail's bytes of the comma or brace before it) and ends."""

    values: dict[str, Any] = field(default_factory=dict)
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)


Member = tuple[str, Any, int, int]  # name, value, start (its comma or brace), end


def _member(s: str, i: int) -> Member | None:
    """The member whose comma or brace is s[i]; its end is the first character after
    its value and the space after it. None where no member starts there."""
    n = len(s)
    start = i
    i += 1
    while i < n and s[i] in " \t\r\n":
        i += 1
    m = _KEY.match(s, i)
    if m is None:
        return None
    try:
        name = json.loads('"' + m.group(1) + '"')
        value, j = _DECODER.raw_decode(s, m.end())
    except (ValueError, RecursionError):  # not JSON there; nested past Python's stack
        return None
    while j < n and s[j] in " \t\r\n":
        j += 1
    return name, value, start, j


def _chain(s: str, i: int) -> list[Member] | None:
    """Members from s[i] to the end; None unless they run, member after member, to the
    final closing brace."""
    members: list[Member] = []
    n = len(s)
    while True:
        member = _member(s, i)
        if member is None:
            return None
        members.append(member)
        j = member[3]
        if j == n - 1 and s[j] == "}":
            return members
        if j >= n or s[j] != ",":
            return None
        i = j


def top_members(tail: bytes) -> TailMembers:
    """The top-level members whose start lies in `tail` (the last bytes of a JSON object,
    trailing space allowed); none when the tail does not end an object."""
    found = TailMembers()
    end = tail.rstrip()
    if not end.endswith(b"}"):
        return found
    # Decode from the first candidate: a comma or brace is a character boundary.
    first = _MEMBER_START_BYTES.search(end)
    if first is None:
        return found
    base = first.start()
    try:
        s = end[base:].decode("utf-8")
    except UnicodeDecodeError:
        return found
    starts = [m.start() for m in _MEMBER_START.finditer(s)]
    members: list[Member] = []
    for i in reversed(starts[-MAX_CANDIDATES:]):
        if not members:
            members = _chain(s, i) or []
        elif (
            s[i] == ","
            and (member := _member(s, i)) is not None
            and member[3] == members[0][2]  # it ends where the next top-level one begins
        ):
            members.insert(0, member)
    for name, value, start, stop in members:
        found.values[name] = value
        found.spans[name] = (base + _bytes_len(s, start), base + _bytes_len(s, stop))
    return found


def _bytes_len(s: str, index: int) -> int:
    return len(s[:index].encode("utf-8")) if not s.isascii() else index


def replace_last_member(tail: bytes, members: TailMembers, name: str, encoded: bytes) -> bytes:
    """`tail` with the top-level member `name` dropped where it is there (an upstream
    proxy's own), and `"name": encoded` added as the document's last member."""
    body = tail.rstrip()
    span = members.spans.get(name)
    if span is not None and body[span[0] : span[0] + 1] == b",":
        start, stop = span
        body = body[:start] + body[stop:]
    return body[:-1] + b',"' + name.encode() + b'":' + encoded + b"}"


def add_members_to_object(
    tail: bytes, members: TailMembers, name: str, added: dict[str, Any]
) -> bytes | None:
    """`tail` with the members `added` put last in the object that the top-level member
    `name` holds; None where `name` is not an object in the tail, or has one of them."""
    value = members.values.get(name)
    span = members.spans.get(name)
    if not isinstance(value, dict) or span is None:
        return None
    if added.keys() & value.keys():
        # An upstream proxy's figures: the member encoded again with this proxy's.
        if tail[span[0] : span[0] + 1] != b",":
            return None
        encoded = orjson.dumps({**value, **added})
        return tail[: span[0]] + b',"' + name.encode() + b'":' + encoded + tail[span[1] :]
    member = tail[span[0] : span[1]].rstrip()
    if not member.endswith(b"}"):
        return None
    close = span[0] + len(member) - 1  # the object's closing brace
    return tail[:close] + _members(added, bool(value)) + tail[close:]


def _members(added: dict[str, Any], after_others: bool) -> bytes:
    text = orjson.dumps(added)[1:-1]  # the members without their braces
    return (b"," if after_others else b"") + text


def splice_into_usage(data: bytes, usage: dict[str, Any], added: dict[str, Any]) -> bytes | None:
    """`data` (a whole answer, parsed as `usage` shows) with the members `added` put last
    in its `usage` object, the backend's bytes otherwise kept; None where the object
    found is not that one (the caller then encodes the document again). A few
    microseconds: `usage` is near the end of every answer."""
    if data.count(b'"usage"') != 1:
        return None  # a nested or echoed `usage` as well: which is which needs a parse
    i = len(data)
    for _ in range(8):  # the last few: `"usage"` may also be a string somewhere after it
        i = data.rfind(b'"usage"', 0, i)
        if i < 0:
            return None
        close = _object_close(data, i + len(b'"usage"'), usage)
        if close is not None:
            return data[:close] + _members(added, bool(usage)) + data[close:]
    return None


def _object_close(data: bytes, j: int, expected: dict[str, Any]) -> int | None:
    """Where the closing brace is of the value after a key ending at `j`, if that value
    is `expected`."""
    while j < len(data) and data[j : j + 1] in b" \t\r\n":
        j += 1
    if data[j : j + 1] != b":":
        return None
    try:
        rest = data[j + 1 :].decode("utf-8")
        value, end = _DECODER.raw_decode(rest, len(rest) - len(rest.lstrip()))
    except (ValueError, RecursionError):
        return None
    if value != expected:
        return None
    close = j + 1 + (end if rest.isascii() else len(rest[:end].encode("utf-8"))) - 1
    return close if data[close : close + 1] == b"}" else None
