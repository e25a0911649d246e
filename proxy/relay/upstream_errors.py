"""aiohttp's failures told in the user's terms: the URL they configured (its scheme, host
and port), what the system said, how much of an answer came before it broke off. aiohttp's
own texts name its internals (`ssl:default` for a plain-HTTP URL, `TransferEncodingError:
400`); they stay in the exception chain, for the debug log. Pure: no I/O."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import aiohttp


def _where(url: str) -> str:
    """scheme://host:port of `url`, the part a connection goes to (the URL itself where
    it does not parse: a port out of range, a bracket left open)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return url
    return f"{parts.scheme}://{parts.hostname}:{port}"


def _system_reason(error: OSError | None) -> str:
    """What the system said, in its own words ("Connection refused"), not asyncio's
    ("Connect call failed ('127.0.0.1', 8000)")."""
    if error is None:
        return ""
    if error.strerror and not error.strerror.startswith("Connect call failed"):
        return error.strerror  # the system's own words (a name that does not resolve)
    if error.errno and error.errno > 0:
        return os.strerror(error.errno)
    return error.strerror or str(error)


def unreachable(exc: aiohttp.ClientError, url: str) -> str:
    """Why a request could not be sent to `url`, or got no answer."""
    where = _where(url)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"cannot reach the backend at {where}: its TLS certificate was refused"
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"cannot reach the backend at {where}: the TLS handshake failed"
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = _system_reason(exc.os_error)
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            reason = f"the host name does not resolve ({reason})" if reason else "no such host"
        return f"cannot reach the backend at {where}: {(reason or 'connection failed').lower()}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return f"the backend at {where} closed the connection without answering"
    if isinstance(exc, aiohttp.InvalidURL):
        return f"the backend URL {url!r} is not a valid URL"
    return f"cannot reach the backend at {where}: {type(exc).__name__}: {exc}"


def broken_off(exc: aiohttp.ClientError, bytes_read: int | None) -> str:
    """Why an answer under way ended before it was whole; `bytes_read`: how much of its
    body had come (None: not counted)."""
    after = "" if bytes_read is None else f" after {bytes_read} bytes of its answer"
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        return f"the backend closed the connection{after}; the answer was not complete"
    return f"the backend's answer broke off{after}: {type(exc).__name__}"
