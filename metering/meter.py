"""The meter: the request path's one door into metering.

A request is `open`ed when it is sent to its backend, told its `first_token` when the
first streamed token shows (prefill is over), and `close`d once, when it ends however it
ends; `close` returns its `EnergyReport`. The registry hands the backend's own running and
waiting counts to `learn` as soon as it reads them. Everything under it is the accounting
(metering/accounting/): the sampler and its ledger, the attribution weights, the queue
model of each backend, the device groups, the report. Nothing here does HTTP.

Every call is O(1) in the number of requests in flight (the ledger's virtual time), and
none waits on a sensor: blocking sources are read on threads of their own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from metering.accounting.attribution import DECODE, Attribution, EngineQueue, Flight
from metering.accounting.groups import bind_channels, gpu_share, time_channel
from metering.accounting.ledger import Ticket
from metering.accounting.prompt_text import prompt_tokens_estimate
from metering.accounting.report import EnergyReport, Tokens, build_report
from metering.accounting.sampler import LEDGER_TICK_HZ, Sampler
from metering.carbon.intensity import IntensityProvider
from metering.carbon.sci import (
    DEFAULT_EMBODIED_KGCO2EQ,
    DEFAULT_LIFESPAN_YEARS,
    Embodied,
    embodied_g,
)
from metering.sources.base import PowerSource
from metering.sources.hardware import describe_hardware

__all__ = ["LEDGER_TICK_HZ", "Lane", "Measurement", "Meter", "Plan"]

log = logging.getLogger("energy_proxy.meter")

_DEFAULT_EMBODIED = Embodied.from_kg_years(DEFAULT_EMBODIED_KGCO2EQ, DEFAULT_LIFESPAN_YEARS)


@dataclass(frozen=True, slots=True)
class Plan:
    """What the meter needs to know of one backend: its name, the GPU indices it runs on
    (None: the GPUs no backend claims) and the most requests it runs at once, if known."""

    name: str
    gpus: Sequence[int] | None = None
    max_running: int | None = None


@dataclass(slots=True)
class Lane:
    """One backend as the meter sees it: the channels its requests draw from (its GPUs,
    the host-wide sources and its time channel), its share of the host's GPUs (SCI's
    RR/ToR) and the model of its admission queue."""

    channels: tuple[str, ...]
    gpu_share: float = 1.0
    queue: EngineQueue = field(default_factory=EngineQueue)


@dataclass(slots=True, eq=False)
class Measurement:
    """One request being measured: from `Meter.open` to `Meter.close`."""

    lane: Lane
    flight: Flight
    ticket: Ticket
    t0_s: float
    report: EnergyReport | None = None

    @property
    def decoding(self) -> bool:
        """Its first token has been seen (the hot path's check before `first_token`)."""
        return self.flight.phase == DECODE


class Meter:
    """Opens, follows and closes each request's measurement; owns the sampler."""

    def __init__(
        self,
        sampler: Sampler,
        intensity: IntensityProvider,
        lanes: Mapping[str, Lane],
        *,
        attribution: Attribution | None = None,
        pue: float = 1.0,
        embodied: Embodied = _DEFAULT_EMBODIED,
    ) -> None:
        self.sampler = sampler
        self.intensity = intensity
        self.attribution = attribution or Attribution()
        self.pue = pue
        self.embodied = embodied
        self._lanes = dict(lanes)

    @classmethod
    def build(
        cls,
        sources: Sequence[PowerSource],
        plans: Sequence[Plan],
        intensity: IntensityProvider,
        *,
        idle_watts: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sample_hz: float = 20.0,
        attribution: str = "queue",
        pue: float = 1.0,
        embodied: Embodied = _DEFAULT_EMBODIED,
    ) -> Meter:
        """The meter of a proxy: each backend bound to the sources it draws from (device
        groups), one time channel per distinct group (the embodied share), the sampler."""
        channels, warnings = bind_channels(sources, {p.name: p.gpus for p in plans})
        for warning in warnings:
            log.warning("%s", warning)
        time_of = {name: time_channel(chans, sources) for name, chans in channels.items()}
        sampler = Sampler(
            sources,
            idle_watts=idle_watts,
            clock=clock,
            time_channels=sorted(set(time_of.values())),
            fast_interval_s=1.0 / sample_hz,
        )
        lanes = {
            p.name: Lane(
                (*channels[p.name], time_of[p.name]),
                gpu_share(channels[p.name], sources),
                EngineQueue(configured=p.max_running),
            )
            for p in plans
        }
        return cls(
            sampler,
            intensity,
            lanes,
            attribution=Attribution(attribution),
            pue=pue,
            embodied=embodied,
        )

    # --- the request path ----------------------------------------------------------------

    def open(
        self,
        backend: str,
        payload: Mapping[str, object],
        *,
        stream: bool,
        embeddings: bool = False,
        serial: bool = False,
    ) -> Measurement:
        """A request is sent to `backend` now. `serial`: the backend runs one request at a
        time (llama-cpp-python), a capacity known without its metrics."""
        lane = self.lane(backend)
        queue = lane.queue
        if serial and queue.capacity is None:
            queue.configured = queue.capacity = 1
        # The prompt's size matters only where a request's prefill can be seen.
        prompt_est = prompt_tokens_estimate(payload) if stream or embeddings else 1.0
        flight = Flight(prompt_est, stream=stream, embeddings=embeddings)
        weight = self.attribution.start(flight, queue)
        ticket, t0_s = self.sampler.start(weight, lane.channels)
        flight.handle = ticket
        return Measurement(lane, flight, ticket, t0_s)

    def first_token(self, m: Measurement) -> None:
        """Its first token came out: prefill is over (and it was admitted), it decodes."""
        weight = self.attribution.first_token(m.flight, m.lane.queue)
        if weight is not None:
            self.sampler.reweigh(m.ticket, weight)

    def close(
        self,
        m: Measurement,
        *,
        answered: bool,
        request_id: str,
        model: str,
        category: str,
        tokens: Tokens | None,
        client_request_id: str | None = None,
    ) -> EnergyReport:
        """It ended (`answered`: with a success the client received). Closes it once;
        later calls return the same report."""
        if m.report is not None:
            return m.report
        attribution, sampler, queue = self.attribution, self.sampler, m.lane.queue
        # Answered while the queue model held it waiting: served out of arrival order, in
        # the place of a request the model admitted (which has not started, then).
        instead = attribution.ran_instead(m.flight, queue) if answered else None
        shares, t1_s = sampler.finish(m.ticket, instead.handle if instead else None)
        # Its place in the backend's queue model goes to the oldest waiting request.
        for admitted, weight in attribution.finish(m.flight, queue):
            sampler.reweigh(admitted.handle, weight)
        # Shares of a time channel are the request's share of busy seconds (carbon/sci.py).
        busy_s = sum(s.energy_j for s in shares if s.name.startswith("time:"))
        domains = sampler.domains
        m.report = build_report(
            request_id=request_id,
            model=model,
            category=category,
            duration_s=t1_s - m.t0_s,
            tokens=tokens or Tokens(None, 0, "proxy"),
            shares=shares,
            domains=domains,
            methods=sampler.methods_for([c for c in m.lane.channels if c in domains]),
            intensity=self.intensity.current(),
            pue=self.pue,
            embodied_g=embodied_g(self.embodied, busy_s, m.lane.gpu_share, 1.0),
            attribution=attribution.mode,
            client_request_id=client_request_id,
        )
        return m.report

    # --- what the backends tell ------------------------------------------------------------

    def learn(self, backend: str, running: float | None, waiting: float | None) -> None:
        """The backend's own running/waiting counts were just read: its queue model learns
        the capacity, and requests it now holds waiting (or admits) change weight."""
        queue = self.lane(backend).queue
        for flight, weight in self.attribution.observe(queue, running, waiting):
            self.sampler.reweigh(flight.handle, weight)

    # --- for readers ------------------------------------------------------------------------

    def lane(self, backend: str) -> Lane:
        """The lane of `backend`; one not planned draws from every source."""
        lane = self._lanes.get(backend)
        if lane is None:
            lane = self._lanes[backend] = Lane(tuple(self.sampler.by_name))
        return lane

    def hardware(self) -> str:
        """What the energy is measured on, for labels: the devices and their methods."""
        return describe_hardware(
            (st.source.name, str(getattr(st.source, "hardware", "") or ""), st.source.method)
            for st in self.sampler.states
        )
