"""Who is calling the proxy's own endpoints: the key check every router shares."""

from __future__ import annotations

from fastapi import Request

from proxy.auth import ApiKey, KeyRing
from proxy.errors import Forbidden, Unauthorized


class Access:
    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys

    def caller(self, request: Request, *, admin: bool = False) -> ApiKey | None:
        """The caller's key (None when the proxy has no keys): 401 without a valid one,
        403 when `admin` is needed and it is not an admin key."""
        if not self.keys.enabled:
            return None
        key = self.keys.identify(request.headers.get("authorization", "").encode("latin-1"))
        if key is None:
            raise Unauthorized("missing or invalid API key for this proxy")
        if admin and not key.admin:
            raise Forbidden("this endpoint needs an admin key")
        return key

    @staticmethod
    def tenant_of(key: ApiKey | None) -> str | None:
        """Whose records a caller may see: its own, or everyone's (admins, no keys)."""
        return None if key is None or key.admin else key.name
