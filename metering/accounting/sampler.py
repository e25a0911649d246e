"""The sampler: reads every power source on a steady tick and at every request boundary.

Reading at the boundaries makes each request's window exact (nothing waits for the next
tick); the tick keeps idle learning, the power gauge and long requests' accounting fresh.
A source whose read fails is marked degraded and skipped; because sources report
cumulative energy, the next good read catches up and nothing drawn in between is lost.

A read here must cost microseconds: it runs on the event loop, at every request's start,
first token and end. Sources whose reads block (NVML's energy counter, sysfs, /proc)
declare `blocking = True` and are read on threads of their own
(metering/sources/background.py); what the sampler reads from them is their latest
reading carried forward to now, so no boundary ever waits for a sensor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from metering.accounting.idle import IdlePower
from metering.accounting.ledger import Ledger, SourceShare, Ticket
from metering.sources.background import in_background
from metering.sources.base import PowerSource, SourceError

log = logging.getLogger("energy_proxy.sampler")

# The event loop's own tick: it only keeps the ledger, the idle estimate and the gauges
# fresh between requests (sensors are sampled on their threads at --sample-hz).
LEDGER_TICK_HZ = 2.0


@dataclass(slots=True)
class SourceState:
    source: PowerSource
    idle: IdlePower
    # A background source's nudge: a request boundary asks its thread for a power sample
    # a moment later (metering/sources/background.py).
    nudge: Callable[[float], None] | None = None
    ok: bool = True
    last_power_w: float = 0.0
    failures: int = 0
    last_error: str = ""


class Sampler:
    """Owns the sources, their idle estimates and the ledger they feed."""

    def __init__(
        self,
        sources: Sequence[PowerSource],
        *,
        idle_watts: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        time_channels: Sequence[str] = (),
        background: bool = True,
        fast_interval_s: float = 0.05,
    ) -> None:
        """`background`: read blocking sources on threads of their own (False reads them
        here, synchronously: for tests that step a fake clock). `fast_interval_s`: how
        often those threads sample power between full reads."""
        if not sources:
            raise ValueError("at least one power source is needed")
        self.clock = clock
        if background:
            sources = in_background(list(sources), fast_interval_s=fast_interval_s, clock=clock)
        self.states = [
            SourceState(s, IdlePower(idle_watts), getattr(s, "nudge", None)) for s in sources
        ]
        self.by_name = {st.source.name: st for st in self.states}
        if len(self.by_name) != len(self.states):
            raise ValueError("power source names must be unique")
        self.domains = {st.source.name: st.source.domain for st in self.states}
        # Channels fed with the clock itself: a request's share of one is its share of the
        # seconds its hardware was busy (for the embodied emissions in SCI).
        self.time_channels = tuple(time_channels)
        self.ledger = Ledger([*self.by_name, *self.time_channels])
        # Per channel set of a boundary: the states and time channels to read.
        self._plans: dict[tuple[str, ...], tuple[list[SourceState], list[str]]] = {}
        # Called with the clock time after each periodic tick (not after boundary reads).
        self.tick_listeners: list[Callable[[float], None]] = []
        self.read_all()

    def read_all(self) -> float:
        """Read every source once and feed the ledger (the tick); returns the clock time."""
        return self._read(self.states, self.time_channels, observe_idle=True)

    def read_quietly(self) -> float:
        """Read every source and feed the ledger, like the tick, but without teaching the
        idle estimates anything (for extra readers, e.g. the live page's samples: the idle
        learning keeps the tick's pace whoever else reads)."""
        return self._read(self.states, self.time_channels, observe_idle=False)

    def _read(
        self,
        states: Sequence[SourceState],
        time_names: Sequence[str],
        *,
        observe_idle: bool,
        boundary: bool = False,
    ) -> float:
        now_s = self.clock()
        channels = self.ledger.channels
        for st in states:
            src = st.source
            if boundary and st.nudge is not None:
                st.nudge(now_s)
            try:
                reading = src.read(now_s)
            except SourceError as exc:
                st.failures += 1
                st.last_error = str(exc)
                if st.ok:
                    log.warning("power source %s degraded: %s", src.name, exc)
                st.ok = False
                continue
            if not st.ok:
                log.warning("power source %s recovered", src.name)
                st.ok = True
            channel = channels[src.name]
            was_idle = channel.members == 0
            channel.record(reading.energy_j, reading.t_s, st.idle.watts)
            if observe_idle:
                st.idle.observe(reading.power_w, idle=was_idle)
            st.last_power_w = reading.power_w
        for name in time_names:
            channels[name].record(now_s, now_s, 0.0)
        return now_s

    def _read_for(self, names: tuple[str, ...] | None) -> float:
        """A boundary: read only the channels whose membership changes. A channel the
        request is not in keeps its weights, so an extra reading there would split nothing
        differently (exact either way), and skipping it keeps a boundary cheap."""
        if names is None:
            return self._read(self.states, self.time_channels, observe_idle=False, boundary=True)
        plan = self._plans.get(names)
        if plan is None:
            plan = self._plans[names] = (
                [self.by_name[n] for n in names if n in self.by_name],
                [n for n in names if n not in self.by_name],
            )
        return self._read(plan[0], plan[1], observe_idle=False, boundary=True)

    def start(
        self,
        weight: float = 1.0,
        names: Sequence[str] | None = None,
        eq: float = 0.0,
        *,
        untracked: bool = False,
        prefill: bool = False,
    ) -> tuple[Ticket, float]:
        """Open a request now in the channels `names` (all by default); returns its ticket
        and the start time. `eq`: 1 when it shares the channels' fixed cost; `untracked`:
        it stands for work the proxy did not send; `prefill`: its weight is prefill work
        (ledger.py)."""
        key = None if names is None else tuple(names)
        t_s = self._read_for(key)
        ticket = self.ledger.start(weight, key, eq, untracked=untracked, prefill=prefill)
        ticket.names = key
        return ticket, t_s

    def reweigh(
        self, ticket: Ticket, weight: float, eq: float | None = None, prefill: bool = False
    ) -> None:
        self._read_for(ticket.names)
        self.ledger.reweigh(ticket, weight, eq, prefill)

    def exchange(self, a: Ticket, b: Ticket) -> None:
        """Swap what two requests in flight are owed so far (Ledger.exchange), read now."""
        self._read_for(a.names)
        self.ledger.exchange(a, b)

    def finish(
        self, ticket: Ticket, took_place_of: Ticket | None = None
    ) -> tuple[list[SourceShare], float]:
        """Close a request now; returns its shares per source and the end time.
        `took_place_of`: a request in flight whose share so far was this one's (it ran in
        that one's place), swapped before closing (Ledger.exchange)."""
        t_s = self._read_for(ticket.names)
        if took_place_of is not None:
            self.ledger.exchange(ticket, took_place_of)
        return self.ledger.finish(ticket), t_s

    @property
    def methods(self) -> list[str]:
        """The measuring methods of the sources that are currently healthy."""
        return sorted({st.source.method for st in self.states if st.ok})

    def methods_for(self, names: Sequence[str]) -> list[str]:
        """The methods that held for these sources (degraded ones are left out)."""
        by_name = self.by_name
        return sorted({by_name[n].source.method for n in names if by_name[n].ok})

    def tick(self) -> float:
        """The periodic reading: every source, then whoever listens (the meter's fit)."""
        now_s = self.read_all()
        for listener in self.tick_listeners:
            listener(now_s)
        return now_s

    async def run(self, hz: float) -> None:
        """Tick forever at `hz` readings per second (cancel to stop). The tick only feeds
        the ledger (idle learning, gauges, idle joules between requests): boundaries read
        at their own times, and blocking sources sample on their own threads."""
        period_s = 1.0 / hz
        next_s = self.clock()
        while True:
            next_s += period_s
            delay_s = next_s - self.clock()
            if delay_s < 0.0:
                # Fell behind (a blocked loop): skip missed ticks instead of bursting.
                next_s = self.clock()
                delay_s = 0.0
            await asyncio.sleep(delay_s)
            self.tick()

    def close(self) -> None:
        for st in self.states:
            st.source.close()
