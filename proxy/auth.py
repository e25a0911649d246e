"""API keys: who is calling (the tenant), and whether it may see everything (admin).

Keys are configured as SHA-256 hashes with a name, so the plain key need not appear in a
config file, an environment variable or a command line (`energy-proxy hash-key` prints the
hash of a key). A request's `Authorization: Bearer <key>` is hashed and compared with every
configured hash in constant time (`hmac.compare_digest`, over all of them whatever
matches). Plain `--api-key KEY` / `ENERGY_PROXY_API_KEY` keys still work: each is an admin
key named `admin` (then `admin-2`, ...), as they were all-powerful before tenants existed.

API keys are random tokens, so one unsalted SHA-256 is enough: there is nothing for a
dictionary to guess. A key chosen by a person should not be used.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from proxy.budgets import Budget

_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str  # the tenant: a label value and a store column, so a bounded, plain name
    sha256: bytes
    admin: bool = False
    budget: Budget | None = None  # its energy/carbon budget (proxy/budgets.py)


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key, as the config wants it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random key (256 bits, URL-safe)."""
    return "ep-" + secrets.token_urlsafe(32)


def parse_key_spec(spec: str) -> ApiKey:
    """`NAME:SHA256HEX` or `NAME:SHA256HEX:admin` (the --key-hash flag and its variable).
    Raises ValueError without echoing the hash."""
    parts = spec.strip().split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "admin"):
        raise ValueError("a key is NAME:SHA256 or NAME:SHA256:admin")
    return make_key(parts[0], parts[1], admin=len(parts) == 3)


def make_key(
    name: str, sha256_hex: str, *, admin: bool = False, budget: Budget | None = None
) -> ApiKey:
    if not _NAME.fullmatch(name):
        raise ValueError(
            "a key's name is 1-64 letters, digits, '.', '_' or '-' (it becomes a label)"
        )
    digest = sha256_hex.strip().lower()
    if not _HEX64.fullmatch(digest):
        raise ValueError(f"key {name!r}: the hash must be 64 hex digits (energy-proxy hash-key)")
    return ApiKey(name, bytes.fromhex(digest), admin, budget)


class KeyRing:
    """The configured keys. Empty: no authentication (every caller is anonymous)."""

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self.keys: tuple[ApiKey, ...] = tuple(keys)
        names = [k.name for k in self.keys]
        if len(set(names)) != len(names):
            raise ValueError("two keys have the same name")
        if len({k.sha256 for k in self.keys}) != len(self.keys):
            raise ValueError("two keys have the same hash")

    @classmethod
    def from_settings(cls, plain_keys: Sequence[str], hashed: Iterable[ApiKey]) -> KeyRing:
        admins = [
            ApiKey("admin" if i == 0 else f"admin-{i + 1}", bytes.fromhex(hash_key(k)), True)
            for i, k in enumerate(plain_keys)
        ]
        return cls([*admins, *hashed])

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.keys)

    def identify(self, authorization: bytes | None) -> ApiKey | None:
        """The key an `Authorization: Bearer <key>` header carries, or None."""
        if not authorization:
            return None
        scheme, _, key = authorization.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        digest = hashlib.sha256(key.strip().encode("latin-1")).digest()
        found = None
        for k in self.keys:  # every one, whatever matches: no timing of the position
            if hmac.compare_digest(digest, k.sha256):
                found = k
        return found
