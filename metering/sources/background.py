"""Blocking power sources read on a thread of their own: the event loop never waits for one.

A sensor read can cost what the proxy does not control. On an H100, NVML's energy counter
takes 3 ms at p50 and 16 ms at p99 (and burns the calling thread's CPU meanwhile); a hung
driver takes forever; a sysfs file can stall. A request boundary must cost the loop
microseconds whatever the sensor does, so every source that declares `blocking = True` is
wrapped in a `BackgroundSource`:

- its thread calls the source's full `read()` (the energy counter: the truth) on a
  schedule, and, where the source has one, the cheap `read_fast()` (one instant power
  sample and an estimate from the last counter value) at the sampling rate in between, and
  publishes each Reading;
- the loop's `read(now_s)` touches no sensor: it takes the latest published Reading and
  extrapolates it to `now_s` with its power, at most `cap_s` ahead, never below what it
  reported before. So a boundary lands at the request's own time, and a request shorter
  than one counter period still gets a fair, non-zero share (power x its time).

Conservation is unchanged: the ledger is exact over whatever monotone cumulative figure it
is fed, and that figure snaps back to the counter at every full read (the source's own
`max(previous, counter)`), so over a run attributed + idle equals the counter's growth; an
estimate that ran ahead is absorbed by later intervals, never added twice.

The schedule (`ReadSchedule`, pure): read the counter no faster than it moves (its update
period, learnt per source in the first seconds by reading it quickly and timing its moves),
and no more often than `budget` of one core allows at the read's measured CPU cost (the
thread's own CPU time per read). With NVML's 3 ms counter and the default 0.4 % budget,
that is one counter read per 750 ms; with a counter that costs microseconds, one per update
period (100 ms on an H100).

A read that fails publishes its error: the loop's `read()` raises SourceError (the sampler
marks the source degraded) until a read succeeds; nothing drawn meanwhile is lost, since
the next good reading is cumulative. A read that does not return at all (a hung driver)
lets the published reading age; past `stale_after_s` the loop's `read()` raises too.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from metering.sources.base import Domain, PowerSource, Reading, SourceError

log = logging.getLogger("energy_proxy.sampler")

# Share of one core the full reads of one source may use, in steady state and while the
# counter's period is being learnt (a few seconds at start-up).
FULL_READ_CPU_BUDGET = 0.004
LEARN_CPU_BUDGET = 0.05
LEARN_MIN_INTERVAL_S = 0.01
LEARN_MAX_S = 3.0
LEARN_MOVES = 16  # counter moves to see before the period is taken as known
DEFAULT_COUNTER_PERIOD_S = 0.1  # if none was seen move while learning
COST_WINDOW = 64  # full reads whose cost the schedule looks at
# A request boundary asks for one power sample a moment after it (a prefill's burst of
# power begins at a start and ends at a first token; 20 Hz samples miss most of a 35 ms
# one), at most one per NUDGE_MIN_GAP_S (50 a second) however many requests come and go.
NUDGE_DELAY_S = 0.002
# The loop carries a reading forward at its power for at least this long (`cap_s`).
MIN_CAP_S = 1.0
NUDGE_MIN_GAP_S = 0.02


@dataclass(frozen=True, slots=True)
class Published:
    """What the thread last made known: the latest good reading, and how the latest
    attempt went ("" when it succeeded), at clock time `attempt_s`."""

    reading: Reading | None
    error: str
    attempt_s: float


def extrapolated_j(reading: Reading, now_s: float, cap_s: float) -> float:
    """The reading's cumulative energy carried forward to `now_s` at its power, by at most
    `cap_s` seconds (a reading from the future is not carried back)."""
    ahead_s = min(max(0.0, now_s - reading.t_s), cap_s)
    return reading.energy_j + reading.power_w * ahead_s


class ReadSchedule:
    """When the next full read of one source is due. Pure: fed what each read cost and
    whether the counter had moved.

    `base_interval_s` applies to sources without a counter period to learn (`learn=False`).
    A counter source is read every LEARN_MIN_INTERVAL_S (within LEARN_CPU_BUDGET) until its
    period is known, then every max(period, cost / budget).
    """

    def __init__(self, base_interval_s: float, *, learn: bool, budget: float) -> None:
        if base_interval_s <= 0.0 or budget <= 0.0:
            raise ValueError("intervals and budgets must be positive")
        self.base_interval_s = base_interval_s
        self.budget = budget
        self.learning = learn
        self._learn_until_s: float | None = None
        self._costs_s: deque[float] = deque(maxlen=COST_WINDOW)
        self._moves_s: list[float] = []
        self.period_s: float | None = None
        self.cost_s = 0.0  # median CPU seconds of a recent full read
        self.interval_s = self._interval_s()  # seconds from one full read to the next

    def observe(self, t_s: float, cost_s: float, moved: bool | None) -> None:
        """A full read at `t_s` that cost `cost_s` of CPU; `moved`: whether the counter
        showed a new value (None for sources without a counter)."""
        self._costs_s.append(max(0.0, cost_s))
        self.cost_s = statistics.median(self._costs_s)
        if self.learning:
            if self._learn_until_s is None:
                self._learn_until_s = t_s + LEARN_MAX_S
            if moved:
                self._moves_s.append(t_s)
            if len(self._moves_s) > LEARN_MOVES or t_s >= self._learn_until_s:
                self.learning = False
                # The first move seen is where reading began, not a move's time: skipped.
                # Each move is seen up to one read late, so a single gap is off by up to a
                # read interval (60 ms at an H100's cost, where the median of gaps learnt
                # 120 ms for 100); over the span of them all, by that over their number.
                moves = self._moves_s[1:]
                self.period_s = (
                    (moves[-1] - moves[0]) / (len(moves) - 1)
                    if len(moves) > 1
                    else DEFAULT_COUNTER_PERIOD_S
                )
        self.interval_s = self._interval_s()

    def _interval_s(self) -> float:
        if self.learning:
            return max(LEARN_MIN_INTERVAL_S, self.cost_s / LEARN_CPU_BUDGET)
        base = self.period_s if self.period_s is not None else self.base_interval_s
        return max(base, self.cost_s / self.budget)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class BackgroundSource:
    """A blocking source read on its own daemon thread; `read()` is the loop's cheap side.

    `fast_interval_s`: how often the thread samples power between full reads (1 / the
    sampling rate), for sources with `read_fast`; sources without it get full reads at
    least this far apart.
    """

    def __init__(
        self,
        source: Any,
        *,
        fast_interval_s: float = 0.05,
        budget: float = FULL_READ_CPU_BUDGET,
        clock: Callable[[], float] = time.monotonic,
        start: bool = True,
    ) -> None:
        self.inner = source
        self.name: str = source.name
        self.domain: Domain = source.domain
        self.hardware: str = str(getattr(source, "hardware", "") or "")
        self._clock = clock
        self._fast = getattr(source, "read_fast", None)
        self._has_counter = bool(getattr(source, "counter_mode", False))
        self.fast_interval_s = fast_interval_s
        self.schedule = ReadSchedule(fast_interval_s, learn=self._has_counter, budget=budget)
        self._full_costs_s: deque[float] = deque(maxlen=1024)
        self._fast_costs_s: deque[float] = deque(maxlen=1024)
        self._reported_j = 0.0
        self._update_limits()
        # Set to wake the thread: by close(), or by a boundary's nudge (a sample due soon).
        self._wake = threading.Event()
        self._stopping = False
        self.nudge_due_s: float | None = None  # when the boundary's sample is due
        self._nudged_s = -math.inf  # when the last nudge was served
        self._boundary_s = -math.inf  # the boundary the pending nudge was asked for
        # The reading the source made when it opened is the first one published.
        now_s = clock()
        try:
            first: Reading | None = source.read(now_s)
            error = ""
        except SourceError as exc:
            first, error = None, str(exc)
        self._published = Published(first, error, now_s)
        self._thread = threading.Thread(target=self._run, name=f"sensor {self.name}", daemon=True)
        if start:
            self._thread.start()

    @property
    def method(self) -> str:
        return str(self.inner.method)

    @property
    def power_window_s(self) -> float:
        """The window the inner source's power readings average over (0: instant)."""
        return float(getattr(self.inner, "power_window_s", 0.0) or 0.0)

    # --- the loop's side: no sensor is touched ----------------------------------------------

    def _update_limits(self) -> None:
        """`cap_s`: how far past its reading the loop may carry an estimate (a little over
        the gap between two published readings, and at least MIN_CAP_S: a thread starved
        of CPU on a loaded host publishes late, and a request inside that delay must still
        be charged for its time); `stale_after_s`: no attempt finished for this long means
        a hung read, and the source is degraded."""
        interval_s = self.schedule.interval_s
        gap_s = self.fast_interval_s if self._fast is not None else interval_s
        self.cap_s = max(MIN_CAP_S, 2.0 * gap_s + 0.05)
        self.stale_after_s = max(2.0, 4.0 * max(interval_s, self.fast_interval_s))

    def read(self, now_s: float) -> Reading:
        pub = self._published
        if pub.error:
            raise SourceError(pub.error)
        if pub.reading is None:
            raise SourceError(f"{self.name}: no reading yet")
        waited_s = now_s - pub.attempt_s
        if waited_s > self.stale_after_s:
            raise SourceError(
                f"{self.name}: no reading for {waited_s:.1f} s (the sensor's read has not "
                "returned: a hung driver?)"
            )
        energy_j = max(self._reported_j, extrapolated_j(pub.reading, now_s, self.cap_s))
        self._reported_j = energy_j
        return Reading(energy_j=energy_j, power_w=pub.reading.power_w, t_s=now_s)

    def nudge(self, now_s: float) -> None:
        """A request boundary at `now_s`: have power sampled NUDGE_DELAY_S after it, unless
        one is pending or the last such sample was less than NUDGE_MIN_GAP_S before. Costs
        the loop one Event.set at most (no sensor is touched); sources without a fast read
        ignore it."""
        if self._fast is None or self.nudge_due_s is not None:
            return
        self.nudge_due_s = max(now_s + NUDGE_DELAY_S, self._nudged_s + NUDGE_MIN_GAP_S)
        self._boundary_s = now_s
        self._wake.set()

    # --- the thread's side ---------------------------------------------------------------

    def _run(self) -> None:
        clock = self._clock
        next_full_s = clock()
        next_fast_s = next_full_s + self.fast_interval_s
        while True:
            due_s = min(next_full_s, next_fast_s) if self._fast is not None else next_full_s
            nudge_s = self.nudge_due_s
            if nudge_s is not None:
                due_s = min(due_s, nudge_s)
            self._wake.wait(max(0.0, due_s - clock()))
            self._wake.clear()
            if self._stopping:
                return
            now_s = clock()
            if now_s < due_s and self.nudge_due_s != nudge_s:
                continue  # woken by a nudge: wait again, for it too
            full = now_s >= next_full_s or self._fast is None
            self.poll(now_s, full=full)
            if full:
                next_full_s = self.next_due_s(now_s, full=True)
            if full or now_s >= next_fast_s:
                next_fast_s = self.next_due_s(now_s, full=False)

    def poll(self, now_s: float, *, full: bool, cost_s: float | None = None) -> None:
        """One read of the sensor at `now_s` (the counter when `full`, else a power
        sample), published for the loop: the thread's body, also called directly by
        harnesses that step a virtual clock. `cost_s`: what the read cost in CPU seconds
        (default: what it took of this thread's CPU time)."""
        src, schedule = self.inner, self.schedule
        fast = self._fast
        c0 = time.thread_time()
        read = src.read if full or fast is None else fast
        nudge_s = self.nudge_due_s
        if hasattr(src, "step_at_s"):
            # A sample that serves a boundary's nudge: the power stepped at the boundary.
            serves = nudge_s is not None and now_s >= nudge_s - 1e-9
            src.step_at_s = self._boundary_s if serves else None
        reading, error = self._attempt(read, now_s)
        spent_s = time.thread_time() - c0 if cost_s is None else cost_s
        if full or fast is None:
            self._full_costs_s.append(spent_s)
            moved = (src.counter_seen_s == now_s) if self._has_counter else None
            schedule.observe(now_s, spent_s, moved if reading is not None else False)
            self._update_limits()
            if self._has_counter:
                # Between counter reads the source interpolates with its power samples:
                # allow it to cover the whole gap to the next counter read.
                period_s = schedule.period_s or DEFAULT_COUNTER_PERIOD_S
                src.interpolation_cap_s = schedule.interval_s + period_s
                src.counter_period_s = period_s
        else:
            self._fast_costs_s.append(spent_s)
        if reading is not None and nudge_s is not None and now_s >= nudge_s - 1e-9:
            self._nudged_s, self.nudge_due_s = now_s, None  # served
        last = self._published.reading
        self._published = Published(reading or last, error, self._clock())

    def next_due_s(self, now_s: float, *, full: bool) -> float:
        """When the next read of that kind is due after one at `now_s`."""
        return now_s + (self.schedule.interval_s if full else self.fast_interval_s)

    def _attempt(
        self, read: Callable[[float], Reading], now_s: float
    ) -> tuple[Reading | None, str]:
        try:
            return read(now_s), ""
        except SourceError as exc:
            return None, str(exc)
        except Exception as exc:  # a sensor bug must not end the thread: degrade instead
            log.exception("power source %s: unexpected error in its read", self.name)
            return None, f"{self.name}: unexpected {type(exc).__name__}: {exc}"

    def stats(self) -> dict[str, float | None]:
        """What reading this source costs and how it is scheduled (for `doctor`, logs)."""
        full, fast = list(self._full_costs_s), list(self._fast_costs_s)
        return {
            "full_read_cpu_p50_s": _percentile(full, 0.5),
            "full_read_cpu_p99_s": _percentile(full, 0.99),
            "fast_read_cpu_p50_s": _percentile(fast, 0.5) if fast else None,
            "full_read_interval_s": self.schedule.interval_s,
            "counter_period_s": self.schedule.period_s,
        }

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        if self._thread.is_alive():
            # A read that does not return (a hung driver): leave the sensor open rather than
            # shut it down under the read; the thread is a daemon and ends with the process.
            log.warning("power source %s: its read has not returned; not closed", self.name)
            return
        self.inner.close()


def in_background(
    sources: list[PowerSource], *, fast_interval_s: float, clock: Callable[[], float]
) -> list[PowerSource]:
    """Each blocking source wrapped in a BackgroundSource (started); others as they are."""
    return [
        BackgroundSource(s, fast_interval_s=fast_interval_s, clock=clock)  # type: ignore[misc]
        if getattr(s, "blocking", False)
        else s
        for s in sources
    ]
