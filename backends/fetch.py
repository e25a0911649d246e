"""The small HTTP interface the backend adapters need, and nothing more.

The proxy's upstream client (proxy/upstream.py) provides it; tests pass a fake. Every
method raises on a transport failure, a status other than 200, or (for JSON) a body that
is not JSON; callers here turn any such failure into "no answer".
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class JsonGetter(Protocol):
    async def get_json(self, url: str, timeout_s: float) -> object: ...

    async def get_text(self, url: str, timeout_s: float) -> str: ...


@runtime_checkable
class JsonPoster(Protocol):
    """A small JSON POST (a backend's tokenize endpoint); not on the request path."""

    async def post_json(self, url: str, body: object, timeout_s: float) -> object: ...
