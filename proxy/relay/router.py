"""Routing among the backends that serve one model: the state the policies need (each
backend's cost model through the meter, its grid intensity, the batch its requests join)
and the choice for one request (backends/choice.py). No I/O: the choice reads figures
kept fresh elsewhere (the registry's gauges, the meter's fit, the intensity's refresh).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from backends.backend import Backend
from backends.choice import (
    CARBON,
    DEFAULT_EXPLORE,
    DEFAULT_MAX_WAITING,
    ENERGY,
    FIRST,
    MEASURED,
    ONLY,
    Candidate,
    choose,
)
from metering.accounting.band import PRIOR_LOG_SD
from metering.accounting.cost_model import CostFit
from metering.accounting.marginal import (
    REFERENCE_OUTPUT_TOKENS,
    REFERENCE_PROMPT_TOKENS,
    Marginal,
    marginal,
)
from metering.carbon.intensity import IntensityProvider
from metering.meter import Meter
from proxy.observe.finished import RequestFinished

J_PER_KWH = 3.6e6
# The batch a backend's requests run in: the mean of its requests in flight while any
# is, over about the last 20 s (older time weighs less by e per BATCH_MEMORY_S).
BATCH_MEMORY_S = 20.0


@dataclass(slots=True)
class Batch:
    """The time-weighted mean of a backend's requests in flight while it is busy, at most
    its capacity: the batch a request there runs in, and shares each step's fixed cost
    with. Told each change of the count (no clock of its own)."""

    area: float = 0.0  # request-seconds, decayed
    busy_s: float = 0.0  # seconds with any request in flight, decayed
    last_s: float | None = None
    running: float = 0.0  # requests in flight since `last_s`

    def change(self, now_s: float, running: float) -> None:
        """The count is `running` from `now_s` on."""
        if self.last_s is not None and now_s > self.last_s:
            dt = now_s - self.last_s
            keep = math.exp(-dt / BATCH_MEMORY_S)
            self.area = self.area * keep + self.running * dt
            self.busy_s = self.busy_s * keep + (dt if self.running > 0.0 else 0.0)
        self.last_s, self.running = now_s, running

    @property
    def mean(self) -> float:
        """The mean batch (1 before anything ran)."""
        return max(1.0, self.area / self.busy_s) if self.busy_s > 0.0 else 1.0


def output_limit(payload: Mapping[str, object]) -> float | None:
    """The most tokens a request asks for (`max_tokens`, `max_completion_tokens`, the
    Responses API's `max_output_tokens`); None when it sets no usable limit."""
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        v = payload.get(name)
        if isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 10_000_000:
            return float(v)
    return None


def held_by_all(fits: Sequence[CostFit]) -> tuple[bool, bool, bool]:
    """For each coefficient, whether every backend holds it at the same default: its
    error is then common to all of them (it moves every estimate alike) and does not
    tell them apart."""
    held = [
        all((not f.trusted or not f.identified[j]) and f.prior == fits[0].prior for f in fits)
        for j in range(3)
    ]
    return held[0], held[1], held[2]


def standard_log_errors(fit: CostFit, shared: Sequence[bool]) -> tuple[float, float, float]:
    """Each coefficient's relative standard error for telling backends apart: the fit's
    own for one it identified, the prior's spread for one held at its default, none for
    one every backend holds at the same default (`held_by_all`)."""
    c = fit.in_use.as_tuple()
    out = []
    for j in range(3):
        err = fit.std_errors[j]
        if shared and shared[j]:
            out.append(0.0)
        elif fit.trusted and fit.identified[j] and err is not None and c[j] > 0.0:
            out.append(min(PRIOR_LOG_SD, err / c[j]))
        else:
            out.append(PRIOR_LOG_SD)
    return out[0], out[1], out[2]


def queued_at(running: float | None, waiting: float | None, most: int | None) -> float | None:
    """A backend's queue by its gauges: their waiting count; but one request shown waiting
    while it runs fewer than it can is one that arrived between two steps and joins the
    next (none queued). More than one is a queue even then (vLLM may be out of KV-cache
    room before it reaches its most). None: its gauges tell no waiting count."""
    if waiting is None:
        return None
    if waiting <= 1.0 and most is not None and running is not None and running < most:
        return 0.0
    return waiting


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request went and why: the `x-energy-route` header, the record's `route`
    (`policy/reason`). Made once per backend, policy and reason (`Router.route`)."""

    backend: Backend
    policy: str
    reason: str
    label: str = ""
    _header: tuple[bytes, bytes] = (b"", b"")

    def __post_init__(self) -> None:
        value = f"policy={self.policy}; backend={self.backend.name}; reason={self.reason}"
        object.__setattr__(self, "label", f"{self.policy}/{self.reason}")
        object.__setattr__(self, "_header", (b"x-energy-route", value.encode("latin-1")))

    def header(self) -> tuple[bytes, bytes]:
        return self._header


@dataclass(frozen=True, slots=True)
class Estimate:
    """A backend's marginal figure for a request shape: J per token, and gCO2eq per
    token at its grid intensity, each with its standard error."""

    energy: Marginal
    g_per_kwh: float

    @property
    def co2eq_g_per_token(self) -> float:
        return self.energy.j_per_token * self.g_per_kwh / J_PER_KWH

    @property
    def co2eq_se_per_token(self) -> float:
        return self.energy.se_per_token * self.g_per_kwh / J_PER_KWH

    def co2eq_band_per_token(self) -> tuple[float, float]:
        """(low, high): the energy's 90 % interval at its grid intensity."""
        low, high = self.energy.band_per_token()
        return low * self.g_per_kwh / J_PER_KWH, high * self.g_per_kwh / J_PER_KWH


@dataclass
class Router:
    """Each model's policy and the choice for each request."""

    meter: Meter
    policy: str = FIRST
    per_model: Mapping[str, str] = field(default_factory=dict)
    explore: float = DEFAULT_EXPLORE
    max_waiting: int = DEFAULT_MAX_WAITING
    # A backend's own grid intensity, where it has one (else the meter's).
    intensities: Mapping[str, IntensityProvider] = field(default_factory=dict)
    draw: Callable[[], float] = field(default_factory=lambda: random.Random().random)
    # The batch each backend's requests run in (`Batch`).
    batches: dict[str, Batch] = field(default_factory=dict)
    # The most requests each backend's gauges have shown running at once.
    peaks: dict[str, int] = field(default_factory=dict)
    _routes: dict[tuple[str, str, str], Route] = field(default_factory=dict)

    def policy_for(self, model: str) -> str:
        return self.per_model.get(model, self.policy)

    def intensity_g_per_kwh(self, backend: str) -> float:
        provider = self.intensities.get(backend, self.meter.intensity)
        return provider.current().g_per_kwh

    def pick(
        self,
        backends: Sequence[Backend],
        model: str,
        prompt_tokens: float,
        output_tokens: float | None,
    ) -> Route:
        """The backend for one request of this shape to `model` (`output_tokens`: what it
        asks for at most; None: what that backend's answers have generated)."""
        policy = self.policy_for(model)
        if len(backends) == 1:
            return self.route(backends[0], policy, ONLY)
        measured = policy in MEASURED
        reference = self._reference_batch(backends) if measured else 1.0
        shared = held_by_all([self.meter.lane(b.name).fit for b in backends]) if measured else ()
        candidates = [
            self._candidate(b, policy, (prompt_tokens, output_tokens), reference, shared)
            for b in backends
        ]
        choice = choose(
            policy,
            candidates,
            explore=self.explore,
            max_waiting=self.max_waiting,
            draw=self.draw() if measured else 1.0,
        )
        return self.route(backends[choice.index], policy, choice.reason)

    def route(self, backend: Backend, policy: str, reason: str) -> Route:
        """The `Route` of this choice (made once: the hot path builds no strings)."""
        key = (backend.name, policy, reason)
        found = self._routes.get(key)
        if found is None or found.backend is not backend:
            found = self._routes[key] = Route(backend, policy, reason)
        return found

    def started(self, backend: Backend) -> None:
        """A request is sent to `backend` now (before the relay counts it in flight)."""
        self._count(backend, +1)

    def finished(self, event: RequestFinished) -> None:
        """A request it routed has finished (an observer: its backend runs one fewer)."""
        if event.route:
            self._count(event.backend, -1)

    def estimate(
        self,
        backend: str,
        prompt_tokens: float = REFERENCE_PROMPT_TOKENS,
        output_tokens: float | None = REFERENCE_OUTPUT_TOKENS,
        batch: float | None = None,
        log_sds: tuple[float, float, float] | None = None,
    ) -> Estimate:
        """What one more request of this shape would add at `backend` (at the batch its
        requests have been joining, unless `batch` is given). Its error: how far one
        request's figure may be off (the split's band, band.py), unless `log_sds` says."""
        lane = self.meter.lane(backend)
        out = lane.rates.nonstream_tokens if output_tokens is None else output_tokens
        energy = marginal(
            lane.fit.in_use,
            lane.log_sds if log_sds is None else log_sds,
            prompt_tokens=prompt_tokens,
            output_tokens=out,
            batch=self.batch_of(backend) if batch is None else batch,
            chunk_tokens=lane.queue.chunk_tokens,
        )
        return Estimate(energy, self.intensity_g_per_kwh(backend))

    def describe(self, backend: str) -> dict[str, object]:
        """What `/readyz` shows of a backend's routing figures."""
        est = self.estimate(backend)
        low, high = est.energy.band_per_token()
        provider = self.intensities.get(backend, self.meter.intensity)
        return {
            "marginal_j_per_token": est.energy.j_per_token,
            "marginal_j_per_token_low": low,
            "marginal_j_per_token_high": high,
            "batch": self.batch_of(backend),
            "most_running_seen": self.peaks.get(backend),
            "carbon": provider.current().to_dict(),
        }

    def batch_of(self, backend: str) -> float:
        """The mean batch its requests have run in (1 before any)."""
        found = self.batches.get(backend)
        return 1.0 if found is None else found.mean

    def _count(self, b: Backend, change: int) -> None:
        """`b` runs `change` more requests from now (the relay changes its count next)."""
        batch = self.batches.setdefault(b.name, Batch())
        running = float(max(0, b.traffic.inflight + change))
        capacity = self.meter.lane(b.name).queue.capacity
        if capacity is not None:
            running = min(running, float(capacity))
        batch.change(self.meter.sampler.clock(), running)

    def _reference_batch(self, backends: Sequence[Backend]) -> float:
        """The batch every backend's estimate is ranked at: their mean. A backend's own
        batch would make the busiest look cheapest (its steps' fixed cost is shared by
        more) and pull ever more traffic to it; at one batch for all, the ranking is the
        backends' own costs."""
        return sum(self.batch_of(b.name) for b in backends) / len(backends)

    def _candidate(
        self,
        b: Backend,
        policy: str,
        shape: tuple[float, float | None],
        reference_batch: float,
        shared: Sequence[bool],
    ) -> Candidate:
        lane = self.meter.lane(b.name)
        own, queue = b.state.own, lane.queue
        per_token = se = None
        if policy in MEASURED:
            sds = standard_log_errors(lane.fit, shared)
            est = self.estimate(b.name, shape[0], shape[1], reference_batch, sds)
            if policy == ENERGY:
                per_token, se = est.energy.j_per_token, est.energy.se_per_token
            elif policy == CARBON:
                per_token, se = est.co2eq_g_per_token, est.co2eq_se_per_token
        running = own.inflight if own is not None else None
        waiting = own.waiting if own is not None else None
        most = self._most_running(b.name, queue.configured, queue.capacity, running)
        queued = queued_at(running, waiting, most)
        if queued and self.meter.on_gauges_wanted is not None:
            # A queue the guard may skip it for: read its gauges again soon (within the
            # fast period), not at the end of the slow one, so a queue gone is seen gone.
            self.meter.on_gauges_wanted(b.name)
        return Candidate(
            b.name,
            ready=b.state.ready,
            inflight=float(b.traffic.inflight),
            own_inflight=None if running is None else running + (waiting or 0.0),
            waiting=queued,
            # What the meter knows of its capacity, never below what it was seen to run.
            capacity=None if queue.capacity is None else max(queue.capacity, most or 0),
            capacity_configured=queue.configured is not None,
            per_token=per_token,
            per_token_se=se,
        )

    def _most_running(
        self, name: str, configured: int | None, known: int | None, running: float | None
    ) -> int | None:
        """The most it can run at once, as far as is known: as configured, else the most
        of the meter's capacity and what its gauges have shown running (it ran that many,
        so it can). None: nothing known."""
        if configured is not None:
            return configured
        peak = max(self.peaks.get(name, 0), int(running or 0))
        self.peaks[name] = peak
        best = max(known or 0, peak)
        return best or None
