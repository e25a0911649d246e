"""A finished request is one event; what happens after it is its observers' business.

The relay builds one `RequestFinished` when a request is settled and hands it to
`Observers.finished`, which tells each observer registered at start-up in turn (metrics,
the backend's token tally, the request store, the live feed, the request log; see
proxy/observe/observers.py), as mitmproxy's addons are told of a flow. An observer that
raises is logged and skipped: it costs its own figure, never another observer's, and
never the answer (which has been settled before they run).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from backends.backend import Backend
from metering.accounting.report import EnergyReport

log = logging.getLogger("energy_proxy.observe")


@dataclass(frozen=True, slots=True)
class RequestFinished:
    """One request the proxy settled, with what its client was told."""

    report: EnergyReport
    energy: Mapping[str, Any]  # the "energy" object, as the client got it
    backend: Backend
    status: int  # the final status (499: the client hung up)
    finished_at: float  # wall-clock seconds since the epoch
    tenant: str  # the key's name ("" without keys)
    model_label: str  # the model, or "other" when no backend lists it (a bounded label)
    span: Any = None  # its OpenTelemetry span, when tracing is on (proxy/observe/tracing.py)
    first_token_s: float | None = None  # from its start to its first streamed token
    route: str = ""  # the routing policy and why this backend (`policy/reason`)


class Observer(Protocol):
    def finished(self, event: RequestFinished) -> None:
        """Called on the request path, once per request: must not block or await."""
        ...


@runtime_checkable
class RejectionObserver(Protocol):
    def rejected(self, status: int) -> None:
        """A request refused before it reached a backend (no energy to attribute)."""
        ...


class Observers:
    """The fan-out: every observer, in the order they were registered."""

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self._finished: list[Observer] = []
        self._rejected: list[RejectionObserver] = []
        self.failures = 0  # observer calls that raised (each one logged)
        for o in observers:
            self.add(o)

    def add(self, observer: Observer) -> None:
        self._finished.append(observer)
        if isinstance(observer, RejectionObserver):
            self._rejected.append(observer)

    def finished(self, event: RequestFinished) -> None:
        for o in self._finished:
            try:
                o.finished(event)
            except Exception:
                self.failures += 1
                log.exception("%s failed on request %s", type(o).__name__, event.report.request_id)

    def rejected(self, status: int) -> None:
        for o in self._rejected:
            try:
                o.rejected(status)
            except Exception:
                self.failures += 1
                log.exception("%s failed on a rejected request", type(o).__name__)
