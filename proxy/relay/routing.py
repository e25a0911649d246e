"""Where a request goes, and who may send it: shared by the metered routes and the paths
passed through (passthrough.py)."""

from __future__ import annotations

from backends.backend import Backend
from backends.registry import BackendRegistry
from proxy.asgi import RawHeaders, Scope
from proxy.auth import ApiKey, KeyRing
from proxy.errors import Unauthorized, UnknownModel
from proxy.headers import header_value


def upstream_url(backend: Backend, scope: Scope) -> str:
    """The backend's URL for this request: its path as the client sent it (still
    percent-encoded: a decoded `%3F` must not become a query), and its query string."""
    raw: bytes | None = scope.get("raw_path")
    path: str = raw.decode("latin-1") if raw else scope["path"]
    query: bytes = scope.get("query_string", b"")
    url = backend.url + path
    return url + "?" + query.decode("latin-1") if query else url


def check_key(keys: KeyRing, headers: RawHeaders) -> ApiKey | None:
    """The caller's key (None when the proxy has no keys); 401 without a valid one."""
    if not keys.enabled:
        return None
    key = keys.identify(header_value(headers, b"authorization"))
    if key is None:
        raise Unauthorized("missing or invalid API key for this proxy")
    return key


async def backends_for_model(registry: BackendRegistry, model: str) -> tuple[Backend, ...]:
    """The backends that list `model`; 404 naming the models served when none does."""
    found = await registry.route(model)
    if not found:
        known = ", ".join(sorted(registry.known_models())) or "none listed yet"
        raise UnknownModel(f"model {model!r} is not served here (models: {known})")
    return found


def first_ready(backends: tuple[Backend, ...]) -> Backend:
    """The first that is ready (the first, when none is: it answers for itself)."""
    return next((b for b in backends if b.state.ready), backends[0])
