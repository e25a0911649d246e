"""Work a backend runs that the proxy did not send: clients that reach it around the proxy.
Pure: no I/O; the caller passes the clock's time.

The backend's own gauges (vLLM's `num_requests_running`, TGI's batch size, llama.cpp's
`requests_processing`) are read every few seconds. When they show more requests running
than the proxy has in flight to that backend, the difference is work the proxy never saw.
Left out of the split, its energy would go to the proxy's requests: a metered stream
beside one sent straight to the backend would be told all of the power. So each backend
holds an account of phantom requests, as many as the difference, each weighed as a
running decoding request (meter.py keeps them as one ticket in the ledger); the energy
they draw accrues to the account, not to the metered requests.

Readings taken while the proxy has nothing in flight to the backend count none: an idle
engine's gauges hold their last step's figures until it steps again, so such a reading
may be stale, and there is no metered request for the difference to protect.

The count is a lower bound: the proxy's own requests that the backend holds waiting count
as running here (the gauges do not say whose requests wait), and so do those the proxy
closed in the last `GRACE_S` (the gauges were read a moment before they reach the meter,
and a request the backend counted then may have ended since), so untracked work is never
overstated. It is the proxy's own count of requests in flight, not the queue model's
inferred split, that is subtracted. The count follows each reading of the gauges, and
falls to zero on a reading without a running count, or when none has come for
`STALE_PERIODS` reading periods (the gauges stopped: what they said no longer holds).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from metering.accounting.ledger import Ticket

STALE_PERIODS = 3.0
# How long a request the proxy closed still counts as its own against the gauges: more
# than a scrape's round trip, far less than a scrape period.
GRACE_S = 0.5
# How long after a reading showed work around the proxy its gauges are read often.
SUSPECT_S = 3.0
# The reading period until two readings show it: --backend-metrics-s's default.
DEFAULT_GAUGE_PERIOD_S = 5.0


def untracked_count(backend_running: float | None, proxy_inflight: int) -> int:
    """Requests the backend runs beyond the proxy's own in flight to it (>= 0)."""
    if backend_running is None or not math.isfinite(backend_running):
        return 0
    return max(0, round(backend_running) - proxy_inflight)


@dataclass(slots=True)
class UntrackedWork:
    """One backend's account of the work the proxy did not send."""

    count: int = 0  # phantom requests now
    ticket: Ticket | None = None  # the account's ticket in the ledger, while count > 0
    closed_j: float = 0.0  # joules its closed tickets were owed (energy sources only)
    last_read_s: float | None = None  # the last reading with a running count
    last_call_s: float | None = None  # the last reading, with a count or without
    period_s: float = DEFAULT_GAUGE_PERIOD_S  # between the last two readings
    # Times the count rose from zero: a request that saw it change shared its backend.
    episodes: int = 0
    seen_since_tick: bool = False  # present at some point since the meter's last tick
    # Work a reading showed while the proxy had nothing in flight (perhaps an idle
    # engine's stale figure): not counted, but worth reading again when a request opens.
    unconfirmed: int = 0
    # Until then the gauges are read often while the proxy has requests in flight: work
    # around the proxy was seen lately, and a read just after a request opened may not
    # count that request yet (the backend admits it a step later).
    suspect_until_s: float = -math.inf
    # When the proxy's requests to the backend ended, over the last GRACE_S.
    recent_ends_s: deque[float] = field(default_factory=deque)

    def ended(self, t_s: float) -> None:
        """One of the proxy's requests to the backend ended at `t_s`."""
        self.recent_ends_s.append(t_s)
        self._forget_ends(t_s)

    def _forget_ends(self, now_s: float) -> None:
        ends = self.recent_ends_s
        while ends and ends[0] < now_s - GRACE_S:
            ends.popleft()

    def read(self, now_s: float, backend_running: float | None, proxy_inflight: int) -> int:
        """A reading of the gauges at `now_s`, with `proxy_inflight` of the proxy's own
        requests in flight to the backend: the count it implies."""
        if self.last_call_s is not None and now_s > self.last_call_s:
            self.period_s = now_s - self.last_call_s
        self.last_call_s = now_s
        self._forget_ends(now_s)
        count = untracked_count(backend_running, proxy_inflight + len(self.recent_ends_s))
        # Nothing of the proxy's runs: an idle engine's gauges keep their last step's
        # count (vLLM updates them as it steps), so the figure may be stale; and there is
        # no metered request to protect. Drawn now, the energy is idle; what it said is
        # kept, so that the next request to open has the gauges read again at once.
        self.unconfirmed = count if proxy_inflight == 0 else 0
        if count > 0:  # seen, counted or not: read often while the proxy's requests run
            self.suspect_until_s = now_s + SUSPECT_S
        if proxy_inflight == 0:
            count = 0
        self.last_read_s = None if backend_running is None else now_s
        return count

    def stale(self, now_s: float) -> bool:
        """No reading with a count for STALE_PERIODS periods: what the last one said no
        longer holds."""
        last_s = self.last_read_s
        return last_s is not None and now_s - last_s > STALE_PERIODS * self.period_s

    def shared_with(self, at_open: bool, episodes_at_open: int) -> bool | None:
        """Whether untracked work ran beside a request that opened seeing `at_open` and
        `episodes_at_open` (then, now, or begun and ended since); None when the gauges
        are not read (nobody can tell)."""
        if at_open or self.count > 0 or self.episodes != episodes_at_open:
            return True
        return False if self.gauged else None

    @property
    def gauged(self) -> bool:
        """The backend's running count is being read (so its absence means something)."""
        return self.last_read_s is not None
