"""One error tree for the proxy, translated to the OpenAI error shape at the boundary.

    ProxyError
    ├── BadRequest            400  malformed JSON, missing `model`, unknown category
    ├── Unauthorized          401  missing or wrong proxy API key
    ├── Forbidden             403  a key that may not do this (an admin-only endpoint)
    ├── UnknownModel          404  no backend lists the model
    ├── NotFound              404  unknown path or record
    ├── BodyTooLarge          413  request body over --max-body-bytes
    ├── ClientTooSlow         408  the request body took longer than --client-timeout
    ├── HeadersTooLarge       431  too many request headers, or too many bytes of them
    ├── StoreUnavailable      503  the request store cannot be read
    └── UpstreamError
        ├── BackendUnreachable  502  connect refused, reset, DNS, protocol error
        └── BackendTimeout      504  no byte from the backend for --backend-timeout seconds

A backend's own error status and body are not ProxyErrors: they pass through unchanged.
"""

from __future__ import annotations

from typing import Any

import orjson


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code)


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class Unauthorized(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class UnknownModel(NotFound):
    code = "model_not_found"


class BudgetExceeded(ProxyError):
    """The key's energy or carbon budget for this period is spent (proxy/budgets.py)."""

    status = 429
    type = "rate_limit_error"
    code = "energy_budget_exceeded"


class BodyTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ClientTooSlow(ProxyError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class HeadersTooLarge(ProxyError):
    status = 431
    type = "invalid_request_error"
    code = "headers_too_large"


class Forbidden(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class StoreUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "store_unavailable"


class TooManyStreams(ProxyError):
    status = 503
    type = "server_error"
    code = "too_many_streams"


class UpstreamError(ProxyError):
    status = 502
    type = "upstream_error"


class BackendUnreachable(UpstreamError):
    status = 502
    code = "backend_unreachable"


class BackendTimeout(UpstreamError):
    status = 504
    code = "backend_timeout"


def error_body(
    message: str, type_: str, code: str | None, *, energy: dict[str, Any] | None = None
) -> bytes:
    """`{"error": {"message", "type", "code"}}`, as OpenAI's API answers errors; with
    `energy`, the energy used before the failure beside them (a stream broken off)."""
    error: dict[str, Any] = {"message": message, "type": type_, "code": code}
    if energy is not None:
        error["energy"] = energy
    return orjson.dumps({"error": error})
