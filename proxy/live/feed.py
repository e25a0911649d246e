"""What the live page shows, kept as it happens: power samples and finished requests.

`power_sample` is the math (pure): from two readings of the ledger's cumulative counters,
each source's mean power over the interval, split into the part attributed to requests, the
part drawn by work the backend ran that the proxy did not send (untracked), and the part
drawn with none in flight (idle). `LiveFeed` keeps the last minutes of samples and
the latest requests for a page that connects, and publishes both through an `EventHub`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from metering.accounting.sampler import Sampler
from metering.carbon.intensity import IntensityProvider
from proxy.live.hub import EventHub

log = logging.getLogger("energy_proxy.live")

SAMPLE_PERIOD_S = 1.0
KEEP_SAMPLES = 600  # ten minutes at one a second
KEEP_REQUESTS = 50
# How each method's figures came about, for the page to say so.
METHOD_KIND = {
    "nvml-counter": "measured",
    "nvml-power": "measured",
    "rapl": "measured",
    "cpu-estimate": "estimate",
    "constant": "configured",
    "trace": "replayed",
}


@dataclass(frozen=True, slots=True)
class Counters:
    """One source's cumulative joules as the ledger has them, at clock time `t_s`."""

    t_s: float
    measured_j: float
    attributed_j: float
    idle_j: float
    untracked_j: float = 0.0  # drawn by work the backend ran that the proxy did not send


def power_sample(before: Counters, after: Counters) -> dict[str, float] | None:
    """Mean watts over the interval: total, attributed to requests, idle (none in flight).
    None for an empty interval. A counter that went back (a sensor reset) counts 0."""
    dt_s = after.t_s - before.t_s
    if dt_s <= 0.0:
        return None

    def watts(a: float, b: float) -> float:
        return max(0.0, b - a) / dt_s

    return {
        "watts": watts(before.measured_j, after.measured_j),
        "attributed_watts": watts(before.attributed_j, after.attributed_j),
        "idle_watts": watts(before.idle_j, after.idle_j),
        "untracked_watts": watts(before.untracked_j, after.untracked_j),
    }


def request_event(
    energy: Mapping[str, Any], *, backend: str, status: int, finished_at: float
) -> dict[str, Any]:
    """A finished request as the page gets it: the energy object the client was told, and
    where and how it ended."""
    return {"finished_at": finished_at, "backend": backend, "status": status, "energy": energy}


class LiveFeed:
    """Samples power once a `period_s`, remembers recent samples and requests, publishes."""

    def __init__(
        self,
        sampler: Sampler,
        intensity: IntensityProvider,
        inflight: Callable[[], int],
        hub: EventHub | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.sampler = sampler
        self.intensity = intensity
        self.inflight = inflight
        self.hub = hub or EventHub()
        self.wall_clock = wall_clock
        self.samples: deque[dict[str, Any]] = deque(maxlen=KEEP_SAMPLES)
        self.requests: deque[tuple[str, dict[str, Any]]] = deque(maxlen=KEEP_REQUESTS)
        self._last: dict[str, Counters] = {}

    # --- what is measured ----------------------------------------------------------------

    def sources(self) -> list[dict[str, Any]]:
        out = []
        for st in self.sampler.states:
            src = st.source
            out.append(
                {
                    "name": src.name,
                    "domain": src.domain,
                    "method": src.method,
                    "kind": METHOD_KIND.get(src.method, "measured"),
                    "hardware": str(getattr(src, "hardware", "") or ""),
                    "ok": st.ok,
                    # The idle draw the dynamic figures are taken above (--idle-watts).
                    "idle_baseline_watts": st.idle.watts,
                }
            )
        return out

    def carbon(self) -> dict[str, Any]:
        return self.intensity.current().to_dict()

    # --- samples -------------------------------------------------------------------------

    def _counters(self) -> dict[str, Counters]:
        t_s = self.sampler.read_quietly()
        channels = self.sampler.ledger.channels
        return {
            st.source.name: Counters(
                t_s,
                channels[st.source.name].measured_j,
                channels[st.source.name].attributed_j,
                channels[st.source.name].idle_j,
                channels[st.source.name].untracked_j,
            )
            for st in self.sampler.states
        }

    def sample(self) -> dict[str, Any] | None:
        """Take one power sample now (None on the first call: it sets the baseline)."""
        now = self._counters()
        ok = {st.source.name: st.ok for st in self.sampler.states}
        per_source: dict[str, Any] = {}
        for name, after in now.items():
            before = self._last.get(name)
            figures = power_sample(before, after) if before is not None else None
            if figures is not None:
                per_source[name] = {**figures, "ok": ok[name]}
        self._last = now
        if not per_source:
            return None
        sample = {
            "t": self.wall_clock(),
            "inflight": self.inflight(),
            "sources": per_source,
            "carbon": self.carbon(),
        }
        self.samples.append(sample)
        return sample

    async def run(self, period_s: float = SAMPLE_PERIOD_S) -> None:
        """Forever (cancel to stop): a sample each `period_s`, published as `power` (the
        first call only sets the baseline)."""
        while True:
            try:
                sample = self.sample()
            except Exception:  # a bug here must not end the page's feed for good
                log.exception("live page: taking a power sample failed")
                sample = None
            if sample is not None:
                self.hub.publish("power", sample)
            await asyncio.sleep(period_s)

    # --- requests ------------------------------------------------------------------------

    def finished(self, event: dict[str, Any], tenant: str) -> None:
        """A request finished (called on the request path: O(subscribers), no await)."""
        self.requests.append((tenant, event))
        self.hub.publish("request", event, tenant=tenant or None)

    def hello(self, tenant: str | None, **extra: Any) -> dict[str, Any]:
        """What a page gets first: what is measured, the recent samples and requests
        (the caller's own, for a tenant)."""
        return {
            "version": 1,
            "sample_period_s": SAMPLE_PERIOD_S,
            "sources": self.sources(),
            "carbon": self.carbon(),
            "inflight": self.inflight(),
            "power": list(self.samples),
            "requests": [e for t, e in self.requests if tenant is None or t == tenant],
            **extra,
        }
