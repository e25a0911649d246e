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

from metering.idle import IdlePower
from metering.ledger import Ledger, SourceShare, Ticket
from metering.sources.background import in_background
from metering.sources.base import PowerSource, SourceError

log = logging.getLogger("energy_proxy.sampler")


@dataclass(slots=True)
class SourceState:
    source: PowerSource
    idle: IdlePower
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
        self.states = [SourceState(s, IdlePower(idle_watts)) for s in sources]
        self.by_name = {st.source.name: st for st in self.states}
        if len(self.by_name) != len(self.states):
            raise ValueError("power source names must be unique")
        self.domains = {st.source.name: st.source.domain for st in self.states}
        # Channels fed with the clock itself: a request's share of one is its share of the
        # seconds its hardware was busy (for the embodied emissions in SCI).
        self.time_channels = tuple(time_channels)
        self.ledger = Ledger([*self.by_name, *self.time_channels])
        self.read_all()

    def read_all(self) -> float:
        """Read every source once and feed the ledger; returns the clock time used."""
        now_s = self.clock()
        ledger = self.ledger
        for st in self.states:
            src = st.source
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
            channel = ledger.channels[src.name]
            was_idle = channel.members == 0
            ledger.record(src.name, reading.energy_j, reading.t_s, st.idle.watts)
            st.idle.observe(reading.power_w, idle=was_idle)
            st.last_power_w = reading.power_w
        for name in self.time_channels:
            ledger.record(name, now_s, now_s)
        return now_s

    def start(
        self, weight: float = 1.0, names: Sequence[str] | None = None
    ) -> tuple[Ticket, float]:
        """Open a request now in the channels `names` (all by default); returns its ticket
        and the start time."""
        t_s = self.read_all()
        return self.ledger.start(weight, names), t_s

    def reweigh(self, ticket: Ticket, weight: float) -> None:
        self.read_all()
        self.ledger.reweigh(ticket, weight)

    def finish(self, ticket: Ticket) -> tuple[list[SourceShare], float]:
        """Close a request now; returns its shares per source and the end time."""
        t_s = self.read_all()
        return self.ledger.finish(ticket), t_s

    @property
    def methods(self) -> list[str]:
        """The measuring methods of the sources that are currently healthy."""
        return sorted({st.source.method for st in self.states if st.ok})

    def methods_for(self, names: Sequence[str]) -> list[str]:
        """The methods that held for these sources (degraded ones are left out)."""
        by_name = self.by_name
        return sorted({by_name[n].source.method for n in names if by_name[n].ok})

    async def run(self, hz: float) -> None:
        """Tick forever at `hz` readings per second (cancel to stop)."""
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
            self.read_all()

    def close(self) -> None:
        for st in self.states:
            st.source.close()
