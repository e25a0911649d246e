"""Which headers cross the proxy. Pure functions over ASGI-style `(bytes, bytes)` lists."""

from __future__ import annotations

from collections.abc import Iterable

# RFC 9110 section 7.6.1 hop-by-hop headers, plus what the proxy sets itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Not forwarded upstream: the upstream client sets host and length itself, and the proxy
# asks for an uncompressed answer so that it can read usage and add the energy object.
_REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"accept-encoding", b"expect"}
# Not copied back: the proxy's server frames the body itself (its length may change).
# x-request-id: the proxy sets its own (the client's, or one it made); a backend's would
# make two values (llama-cpp-python makes its own for every answer).
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length", b"server", b"date", b"x-request-id"}
# The figures this proxy tells: a backend's own (or another energy-proxy's in front of it)
# would reach the client twice, with other values. Dropped, whatever their case.
OWN_RESPONSE_HEADERS = frozenset(
    {
        b"x-energy-joules",
        b"x-energy-gpu-joules",
        b"x-energy-cpu-joules",
        b"x-energy-method",
        b"x-energy-request-id",
        b"x-carbon-intensity",
        b"x-carbon-intensity-source",
        b"x-carbon-intensity-age-s",
        b"x-co2eq-grams",
        b"x-sci-grams",
        b"x-prompt-category",
        b"x-request-id-rejected",
    }
)


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names listed in `Connection:` are hop-by-hop too (RFC 9110 7.6.1)."""
    out: set[bytes] = set()
    for k, v in headers:
        if k.lower() == b"connection":
            out.update(t.strip().lower() for t in v.split(b",") if t.strip())
    return out


def upstream_request_headers(
    headers: Iterable[tuple[bytes, bytes]],
    *,
    drop_authorization: bool = False,
    drop_request_id: bool = False,
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> list[tuple[bytes, bytes]]:
    """The client's request headers as the backend should see them.

    `drop_authorization` when the proxy consumed the client's key itself (the backend's
    own key, if any, comes in `extra`). `drop_request_id` for backends that refuse an
    `x-request-id` of a shape they do not expect (the client still gets its id back).
    Cookies pass through per request and are never stored, so one user's cookie cannot
    reach another's request.
    """
    headers = list(headers)
    drop = _REQUEST_DROP | _connection_tokens(headers)
    out = [
        (k, v)
        for k, v in headers
        if (kl := k.lower()) not in drop
        and not (drop_authorization and kl == b"authorization")
        and not (drop_request_id and kl == b"x-request-id")
    ]
    out.extend(extra)
    out.append((b"accept-encoding", b"identity"))
    return out


def downstream_response_headers(
    headers: Iterable[tuple[bytes, bytes]],
) -> list[tuple[bytes, bytes]]:
    """The backend's response headers as the client should see them (names lower-cased)."""
    lowered = [(k.lower(), v) for k, v in headers]
    drop = _RESPONSE_DROP | OWN_RESPONSE_HEADERS | _connection_tokens(lowered)
    return [(k, v) for k, v in lowered if k not in drop]


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of `name` (lower-case), or None."""
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


# Limits on what a client may send in headers (the server's own parser has looser ones).
MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 * 1024
MAX_CLIENT_ID_CHARS = 128


def header_limit_problem(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """Why these request headers are refused ("" when they are within the limits)."""
    n = size = 0
    for k, v in headers:
        n += 1
        size += len(k) + len(v)
    if n > MAX_HEADERS:
        return f"{n} request headers; at most {MAX_HEADERS} are accepted"
    if size > MAX_HEADER_BYTES:
        return f"{size} bytes of request headers; at most {MAX_HEADER_BYTES} are accepted"
    return ""


_ID_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:/+=@-")


def client_request_id(raw: bytes | None) -> tuple[str | None, str]:
    """The client's `x-request-id` if usable (1-128 of letters, digits and `._:/+=@-`:
    UUIDs, ULIDs, base64 and dotted ids pass; markup and control bytes do not), and why
    it was not ("" when it was, or none was sent)."""
    if raw is None:
        return None, ""
    if not raw:
        return None, "empty"
    if len(raw) > MAX_CLIENT_ID_CHARS:
        return None, f"longer than {MAX_CLIENT_ID_CHARS} characters"
    if not _ID_BYTES.issuperset(raw):
        return None, "characters other than letters, digits and ._:/+=@-"
    return raw.decode("ascii"), ""
