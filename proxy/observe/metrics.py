"""Prometheus metrics on an explicit registry, names as docs/INTERFACE.md fixes them.

Per-request metrics are observed once when a request finishes. Energy totals and power
are read from the sampler at scrape time by a collector, so the hot path pays nothing
for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from backends.backend import Backend
from metering.accounting.report import EnergyReport
from metering.accounting.sampler import Sampler
from metering.carbon.intensity import Intensity
from metering.store import StoreStatus
from proxy.live.hub import EventHub
from proxy.observe.finished import RequestFinished


def log_buckets(low: float, high: float, per_decade: int) -> tuple[float, ...]:
    """Log-spaced histogram bounds from `low` to `high` inclusive."""
    out: list[float] = []
    k = 0
    while True:
        b = low * 10 ** (k / per_decade)
        if b > high * 1.000001:
            break
        out.append(float(f"{b:.3g}"))
        k += 1
    return tuple(out)


ENERGY_BUCKETS_J = log_buckets(0.01, 100_000.0, 3)  # 0.01 J .. 100 kJ
CO2_BUCKETS_G = log_buckets(1e-6, 100.0, 2)  # 1 ug .. 100 g
DURATION_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BAND_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)

# `endpoint`: the API kind (chat, completions, embeddings, responses, messages, audio,
# rerank, score, pooling); `none` for requests refused before reaching one.
LABELS = ("model", "category", "backend", "endpoint")
# A backend's untracked account by name: (requests it stands for now, joules so far).
UntrackedReader = Callable[[str], tuple[int, float]]


class _SamplerCollector(Collector):
    def __init__(self, sampler: Sampler, intensity: Callable[[], Intensity]) -> None:
        self._sampler = sampler
        self._intensity = intensity

    def collect(self) -> Iterator[Metric]:
        energy = CounterMetricFamily(
            "energy_proxy_energy_joules",
            "Energy measured, by source; scope=attributed went to the proxy's requests, "
            "untracked to work the backend ran that the proxy did not send, idle to none.",
            labels=("source", "scope"),
        )
        power = GaugeMetricFamily(
            "energy_proxy_power_watts", "Latest power reading by source.", labels=("source",)
        )
        up = GaugeMetricFamily(
            "energy_proxy_power_source_up",
            "1 while the power source reads, 0 while it is degraded.",
            labels=("source", "method"),
        )
        for st in self._sampler.states:
            ch = self._sampler.ledger.channels[st.source.name]
            energy.add_metric((st.source.name, "attributed"), ch.attributed_j)
            energy.add_metric((st.source.name, "untracked"), ch.untracked_j)
            energy.add_metric((st.source.name, "idle"), ch.idle_j)
            power.add_metric((st.source.name,), st.last_power_w)
            up.add_metric((st.source.name, st.source.method), 1.0 if st.ok else 0.0)
        intensity = self._intensity()
        ci = GaugeMetricFamily(
            "energy_proxy_carbon_intensity_grams_per_kwh",
            "Grid carbon intensity in use, gCO2eq/kWh.",
            labels=("zone", "source"),
        )
        ci.add_metric((intensity.zone, intensity.source), intensity.g_per_kwh)
        yield from (energy, power, up, ci)
        if intensity.age_s is not None:
            age = GaugeMetricFamily(
                "energy_proxy_carbon_intensity_age_seconds",
                "Seconds since the live carbon intensity in use was fetched.",
                labels=("zone",),
            )
            age.add_metric((intensity.zone,), intensity.age_s)
            yield age


class _BackendCollector(Collector):
    """Requests in flight per backend, as the proxy counts them and as the backend itself
    does (where it exports a count), and the token cross-check."""

    def __init__(
        self, backends: Sequence[Backend], untracked: UntrackedReader | None = None
    ) -> None:
        self._backends = backends
        self._untracked = untracked

    def collect(self) -> Iterator[Metric]:
        # The relay keeps Backend.traffic; the gauge is read from it at scrape time.
        ours = GaugeMetricFamily(
            "energy_proxy_inflight_requests",
            "Requests in flight through the proxy.",
            labels=("backend",),
        )
        own = GaugeMetricFamily(
            "energy_proxy_backend_inflight_requests",
            "Requests in flight as the backend itself counts them (from its /metrics).",
            labels=("backend",),
        )
        gap = GaugeMetricFamily(
            "energy_proxy_backend_untracked_tokens",
            "Tokens the backend counted that the proxy did not, since the proxy's first read "
            "of its counters (positive and growing: traffic bypasses the proxy; meaningful "
            "when the backend is idle, as in-flight tokens count on its side first).",
            labels=("backend", "type"),
        )
        untracked_now = GaugeMetricFamily(
            "energy_proxy_backend_untracked_requests",
            "Requests the backend runs beyond the proxy's own (from its gauges): work sent "
            "around the proxy, held in the untracked account.",
            labels=("backend",),
        )
        untracked_j = CounterMetricFamily(
            "energy_proxy_backend_untracked_energy_joules",
            "Joules drawn by work the backend ran that the proxy did not send (not charged "
            "to the proxy's requests).",
            labels=("backend",),
        )
        for b in self._backends:
            if self._untracked is not None:
                requests_now, joules = self._untracked(b.name)
                untracked_now.add_metric((b.name,), requests_now)
                untracked_j.add_metric((b.name,), joules)
            ours.add_metric((b.name,), b.traffic.inflight)
            if b.own_inflight is not None:
                own.add_metric((b.name,), b.own_inflight)
            untracked = b.state.untracked
            if untracked is not None:
                gap.add_metric((b.name, "prompt"), untracked[0])
                gap.add_metric((b.name, "completion"), untracked[1])
        yield ours
        yield own
        yield gap
        if self._untracked is not None:
            yield untracked_now
            yield untracked_j


class _CostModelCollector(Collector):
    """Each backend's cost model (metering/accounting/cost_model.py), read at scrape time."""

    def __init__(self, cost_models: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self._cost_models = cost_models

    def collect(self) -> Iterator[Metric]:
        coef = GaugeMetricFamily(
            "energy_proxy_cost_model_coefficient",
            "The backend's cost model: fixed_w (watts while it steps), prefill_j_per_token, "
            "decode_j_per_token (defaults until fitted on this host).",
            labels=("backend", "term"),
        )
        fitted = GaugeMetricFamily(
            "energy_proxy_cost_model_fitted_timestamp_seconds",
            "When the backend's cost model was last fitted (unix seconds; 0: never, defaults).",
            labels=("backend",),
        )
        band = GaugeMetricFamily(
            "energy_proxy_cost_model_band_ratio",
            "Relative part of each interval's energy the backend's cost model does not explain.",
            labels=("backend",),
        )
        stderr = GaugeMetricFamily(
            "energy_proxy_cost_model_coefficient_stderr",
            "Standard error of each cost-model coefficient from the intervals alone (NaN "
            "until fitted, or where the work never varied), an estimate.",
            labels=("backend", "term"),
        )
        identified = GaugeMetricFamily(
            "energy_proxy_cost_model_identified",
            "1 where the intervals pin the coefficient down (it is this host's), 0 where they "
            "cannot (held at its default).",
            labels=("backend", "term"),
        )
        for name, model in self._cost_models().items():
            errors, known = model.get("std_errors") or {}, model.get("identified") or {}
            for term in ("fixed_w", "prefill_j_per_token", "decode_j_per_token"):
                coef.add_metric((name, term), model[term])
                err = errors.get(term)
                stderr.add_metric((name, term), float("nan") if err is None else err)
                identified.add_metric((name, term), 1.0 if known.get(term) else 0.0)
            fitted.add_metric((name,), model["fitted_at"] or 0.0)
            band.add_metric((name,), model["band_rel"])
        yield from (coef, stderr, identified, fitted, band)


class _StoreCollector(Collector):
    """The request store's health, read at scrape time."""

    def __init__(self, status: Callable[[], StoreStatus]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        st = self._status()
        queued = GaugeMetricFamily(
            "energy_proxy_store_queued_records",
            "Answered requests whose records are not yet written to the request store.",
        )
        queued.add_metric((), st.queued)
        dropped = CounterMetricFamily(
            "energy_proxy_store_dropped_records",
            "Records never stored: the queue was full while the database could not be "
            "written, or the database refused the record.",
        )
        dropped.add_metric((), st.dropped)
        evicted = CounterMetricFamily(
            "energy_proxy_store_evicted_records",
            "Stored records dropped, oldest first, to keep the store under --db-max-mb or "
            "when the disk was full (the summaries keep counting them).",
        )
        evicted.add_metric((), st.evicted)
        up = GaugeMetricFamily(
            "energy_proxy_store_up",
            "1 while the request store's last write succeeded, 0 while writes fail.",
            labels=("kind",),
        )
        up.add_metric((st.kind,), 1.0 if st.writing else 0.0)
        yield from (queued, dropped, evicted, up)


class _LiveStreamsCollector(Collector):
    """The live page's event streams (proxy/live/hub.py), read at scrape time."""

    def __init__(self, hub: EventHub) -> None:
        self._hub = hub

    def collect(self) -> Iterator[Metric]:
        open_ = GaugeMetricFamily(
            "energy_proxy_live_streams",
            "Live-event streams open now (/v1/energy/events: live pages and other readers).",
        )
        open_.add_metric((), len(self._hub))
        dropped = CounterMetricFamily(
            "energy_proxy_live_streams_dropped",
            "Live-event streams dropped because their reader fell behind.",
        )
        dropped.add_metric((), self._hub.dropped_total)
        yield from (open_, dropped)


class ProxyMetrics:
    """Every metric of the proxy, registered on `registry`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        sampler: Sampler,
        intensity: Callable[[], Intensity],
        backends: Sequence[Backend],
        store_status: Callable[[], StoreStatus] | None = None,
        cost_models: Callable[[], dict[str, dict[str, Any]]] | None = None,
        untracked: UntrackedReader | None = None,
    ) -> None:
        self.registry = registry
        self._children: dict[tuple[str, str, str, str, int], tuple[Any, ...]] = {}
        self.requests = Counter(
            "energy_proxy_requests",
            "Requests answered, by final status (499: the client hung up).",
            (*LABELS, "status"),
            registry=registry,
        )
        self.energy = Histogram(
            "energy_proxy_request_energy_joules",
            "Energy attributed per request, joules.",
            LABELS,
            buckets=ENERGY_BUCKETS_J,
            registry=registry,
        )
        self.co2 = Histogram(
            "energy_proxy_request_co2eq_grams",
            "Operational emissions per request, grams CO2eq.",
            LABELS,
            buckets=CO2_BUCKETS_G,
            registry=registry,
        )
        self.duration = Histogram(
            "energy_proxy_request_duration_seconds",
            "Request duration through the proxy, seconds.",
            LABELS,
            buckets=DURATION_BUCKETS_S,
            registry=registry,
        )
        self.tokens = Counter(
            "energy_proxy_tokens",
            "Tokens processed, by type (prompt/completion).",
            (*LABELS, "type"),
            registry=registry,
        )
        # Per tenant (API key name): only configured names ever become a label value.
        self.tenant_requests = Counter(
            "energy_proxy_tenant_requests",
            "Requests answered per tenant (API key name), by final status.",
            ("tenant", "status"),
            registry=registry,
        )
        self.tenant_energy = Counter(
            "energy_proxy_tenant_energy_joules",
            "Energy attributed to each tenant's requests, joules.",
            ("tenant",),
            registry=registry,
        )
        self.band = Histogram(
            "energy_proxy_request_energy_band_ratio",
            "Relative uncertainty of each request's joules (an estimate: the cost model's "
            "residual and the sensor's resolution).",
            LABELS,
            buckets=BAND_BUCKETS,
            registry=registry,
        )
        registry.register(_SamplerCollector(sampler, intensity))
        if cost_models is not None:
            registry.register(_CostModelCollector(cost_models))
        registry.register(_BackendCollector(backends, untracked))
        if store_status is not None:
            registry.register(_StoreCollector(store_status))

    def watch_live_streams(self, hub: EventHub) -> None:
        self.registry.register(_LiveStreamsCollector(hub))

    # --- observing requests (proxy/observe/finished.py) -----------------------------------

    def finished(self, event: RequestFinished) -> None:
        self.observe(event.report, event.backend.name, event.status, event.model_label)
        if event.tenant:
            self.observe_tenant(event.tenant, event.report, event.status)

    def rejected(self, status: int) -> None:
        self.count_rejected("other", "other", "none", status)

    def observe_tenant(self, tenant: str, report: EnergyReport, status: int) -> None:
        """`tenant` is a configured key's name, never free text (it becomes a label)."""
        self.tenant_requests.labels(tenant, str(status)).inc()
        self.tenant_energy.labels(tenant).inc(report.energy_j)

    def observe(self, report: EnergyReport, backend: str, status: int, model_label: str) -> None:
        key = (model_label, report.category, backend, report.endpoint, status)
        children = self._children.get(key)
        if children is None:
            # Label sets are bounded (listed models, configured categories and backends,
            # the API kinds), so this cache is too; it saves label lookups per request.
            labels = key[:4]
            children = self._children[key] = (
                self.requests.labels(*labels, str(status)),
                self.energy.labels(*labels),
                self.co2.labels(*labels),
                self.duration.labels(*labels),
                self.tokens.labels(*labels, "prompt"),
                self.tokens.labels(*labels, "completion"),
                self.band.labels(*labels),
            )
        requests, energy, co2, duration, prompt, completion, band = children
        requests.inc()
        energy.observe(report.energy_j)
        co2.observe(report.co2eq_g)
        duration.observe(report.duration_s)
        if report.tokens.prompt:
            prompt.inc(report.tokens.prompt)
        if report.tokens.completion:
            completion.inc(report.tokens.completion)
        if report.band_rel is not None:
            band.observe(report.band_rel)

    def count_rejected(self, model_label: str, category: str, backend: str, status: int) -> None:
        """A request refused before it reached a backend (no energy to attribute)."""
        self.requests.labels(model_label, category, backend, "none", str(status)).inc()
