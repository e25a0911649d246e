"""Compressed answers on metered paths. Pure.

The proxy asks backends for `accept-encoding: identity` because it reads usage and adds
an energy object; a backend that compresses anyway (a gzip middleware that ignores the
header) is decoded here, so the energy is never spliced into or appended after
compressed bytes. The client then gets the answer uncompressed, its
`content-encoding` header dropped. An encoding with no decoder here (br, zstd) is
relayed as it came, the energy in headers only.
"""

from __future__ import annotations

import zlib

from proxy.asgi import RawHeaders

# zlib's wbits: 32 + 15 reads a gzip or a zlib header, whichever comes.
_GZIP_OR_ZLIB = 47
_DECODABLE = frozenset({b"gzip", b"x-gzip", b"deflate"})


def content_coding(headers: RawHeaders) -> bytes:
    """The answer's `content-encoding`, lower-cased ("" for none or identity)."""
    for k, v in headers:
        if k.lower() == b"content-encoding":
            coding = v.strip().lower()
            return b"" if coding == b"identity" else coding
    return b""


def decodable(coding: bytes) -> bool:
    return coding in _DECODABLE


class StreamDecoder:
    """Decodes a compressed body chunk by chunk (`coding` must be decodable). Raw
    deflate, which some servers send as `deflate`, is tried when no zlib header comes."""

    __slots__ = ("_coding", "_d", "_started")

    def __init__(self, coding: bytes) -> None:
        self._coding = coding
        self._d = zlib.decompressobj(_GZIP_OR_ZLIB)
        self._started = False

    def __call__(self, chunk: bytes) -> bytes:
        if not self._started and chunk:
            self._started = True
            try:
                return self._d.decompress(chunk)
            except zlib.error:
                if self._coding != b"deflate":
                    raise
                self._d = zlib.decompressobj(-15)
        return self._d.decompress(chunk)


def decode_whole(coding: bytes, body: bytes) -> bytes:
    """A whole compressed body, decoded (raises zlib.error when it is not what it says)."""
    return StreamDecoder(coding)(body)


def without_coding(headers: RawHeaders) -> RawHeaders:
    """Response headers for a body the proxy decoded."""
    return [(k, v) for k, v in headers if k.lower() != b"content-encoding"]
