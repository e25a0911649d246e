"""One backend, in three parts with one owner each.

- `BackendConfig`: what the operator configured (name, URL, kind, keys, GPUs); frozen.
- `Discovery`: what the registry found out (its kind when detected, models, readiness,
  its own metrics and the token cross-check); written by `BackendRegistry` only.
- `Traffic`: what the proxy's requests do to it (requests in flight, tokens of finished
  requests); written by the request path only, read by the registry and the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backends.adapters import Adapter, adapter_for
from backends.crosscheck import Baseline, TokenTally
from backends.kinds import AUTO, OPENAI, Kind, kind_named
from backends.own_metrics import OwnMetrics

# Where a backend's kind came from (`/readyz` `kind_source`).
CONFIGURED, DETECTED, UNDETECTED = "configured", "detected", "undetected"


def base_url(url: str) -> str:
    """Accept `http://host:port` and `http://host:port/v1` alike."""
    return url.rstrip("/").removesuffix("/v1")


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One configured backend. `kind` is one of `KIND_NAMES`, or "auto" (detected)."""

    name: str
    url: str
    kind: str = OPENAI
    api_key: str | None = field(default=None, repr=False)
    forward_authorization: bool = False  # pass the client's own Authorization header on
    gpus: tuple[int, ...] | None = None
    max_running: int | None = None  # the most requests it runs at once, when known
    prefill_chunk_tokens: int | None = None  # prompt tokens it prefills a step, when known

    def __post_init__(self) -> None:
        if self.kind != AUTO:
            kind_named(self.kind)  # ValueError for an unknown kind
        object.__setattr__(self, "url", base_url(self.url))


@dataclass(slots=True)
class Discovery:
    """What the registry knows of a backend now. Given as "auto", the kind reads "openai"
    until detection tells (`kind_source` "undetected", then "detected")."""

    kind: str
    kind_source: str = CONFIGURED
    models: list[dict[str, Any]] = field(default_factory=list)
    ready: bool = False
    listed: bool = False  # the model list has been fetched at least once
    last_error: str = ""
    # The backend's own figures from its /metrics; None where its kind exports none.
    own: OwnMetrics | None = None
    token_baseline: Baseline | None = None
    untracked: tuple[float, float] | None = None  # (prompt, completion) tokens

    @property
    def model_ids(self) -> list[str]:
        return [str(m["id"]) for m in self.models if "id" in m]


@dataclass(slots=True)
class Traffic:
    """The proxy's own requests to a backend."""

    inflight: int = 0
    # Tokens of the requests the proxy finished for it (backends/crosscheck.py).
    tally: TokenTally = field(default_factory=TokenTally)


class Backend:
    """A backend: its configuration, what was discovered about it, and its traffic."""

    __slots__ = ("config", "state", "traffic")

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        if config.kind == AUTO:
            self.state = Discovery(OPENAI, UNDETECTED)
        else:
            self.state = Discovery(config.kind)
        self.traffic = Traffic()

    def __repr__(self) -> str:
        return f"Backend({self.config.name!r}, {self.config.url!r}, kind={self.state.kind!r})"

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def spec(self) -> Kind:
        """What the backend's kind does and offers (health, usage in streams, ...)."""
        return kind_named(self.state.kind)

    @property
    def adapter(self) -> Adapter:
        return adapter_for(self.state.kind)

    @property
    def own_inflight(self) -> float | None:
        """The backend's own count of requests in flight, where it exports one."""
        own = self.state.own
        return own.inflight if own is not None else None

    def describe(self) -> dict[str, Any]:
        s = self.state
        return {
            "name": self.name,
            "url": self.url,
            "kind": s.kind,
            "kind_source": s.kind_source,
            "ready": s.ready,
            "models": s.model_ids,
            **({"error": s.last_error} if s.last_error else {}),
        }
