"""Routing on /metrics: where requests went and why, and each backend's marginal cost per
token: the signal the proxy's own `energy`/`carbon` policies use, and what a router
outside it (llm-d's endpoint picker) can score endpoints on (docs/routing.md)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from backends.backend import Backend
from metering.accounting.marginal import REFERENCE_OUTPUT_TOKENS, REFERENCE_PROMPT_TOKENS
from proxy.observe.finished import RequestFinished
from proxy.relay.router import Router

_SHAPE = (
    f"a request of {REFERENCE_PROMPT_TOKENS} prompt tokens and {REFERENCE_OUTPUT_TOKENS} "
    "output tokens at the batch the backend's requests have been joining"
)


class MarginalCost(Collector):
    """Per backend and model, read at scrape time: the dynamic energy and gCO2eq one more
    request adds per output token, with a central 90 % interval (an estimate)."""

    def __init__(self, router: Router, backends: Sequence[Backend]) -> None:
        self._router = router
        self._backends = backends

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ("backend", "model")
        families = {
            (kind, bound): GaugeMetricFamily(
                f"energy_proxy_backend_marginal_{unit}_per_token{suffix}",
                f"{what} one more request adds per output token at this backend{extra}: "
                f"{_SHAPE} (an estimate from its cost model; lower is cheaper).",
                labels=labels,
            )
            for kind, unit, what in (
                ("j", "joules", "Dynamic energy (J)"),
                ("g", "co2eq_grams", "Operational emissions (gCO2eq, at its grid intensity)"),
            )
            for bound, suffix, extra in (
                ("mid", "", ""),
                ("low", "_low", ", low end of a 90 % interval"),
                ("high", "_high", ", high end of a 90 % interval"),
            )
        }
        for b in self._backends:
            est = self._router.estimate(b.name)
            j_low, j_high = est.energy.band_per_token()
            g_low, g_high = est.co2eq_band_per_token()
            values = {
                ("j", "mid"): est.energy.j_per_token,
                ("j", "low"): j_low,
                ("j", "high"): j_high,
                ("g", "mid"): est.co2eq_g_per_token,
                ("g", "low"): g_low,
                ("g", "high"): g_high,
            }
            for model in b.state.model_ids or ["other"]:
                for key, family in families.items():
                    family.add_metric((b.name, model), values[key])
        yield from families.values()


class RoutedRequests:
    """Counts each finished request by model, backend, policy and reason (an observer)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.counter = Counter(
            "energy_proxy_routed_requests",
            "Requests by the backend the routing policy chose, and why (reason: only, first, "
            "least-loaded, lowest, tie, explore, all-queued, all-down).",
            ("model", "backend", "policy", "reason"),
            registry=registry,
        )

        self._children: dict[tuple[str, str, str], Any] = {}

    def finished(self, event: RequestFinished) -> None:
        if not event.route:
            return
        key = (event.model_label, event.backend.name, event.route)
        child = self._children.get(key)
        if child is None:
            policy, _, reason = event.route.partition("/")
            child = self._children[key] = self.counter.labels(key[0], key[1], policy, reason)
        child.inc()
