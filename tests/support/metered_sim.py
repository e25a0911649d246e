"""The engine simulator served through the proxy's real meter, in virtual time, with a
sensor as real as an H100's: the fairness check of tests/support/fairness.py without its
perfect counter.

The engine (tests/support/fakes/batching_engine.py) yields what the proxy would see of each
request (start, first streamed token, end). The proxy's own code does the rest: the Meter
(metering/meter.py: attribution, sampler, ledger) over a power source, which is either

- `perfect`: the truth at every read (the energy drawn up to that instant), or
- `h100`: the proxy's NvmlGpuSource over a simulated NVML (tests/support/fakes/gpu_sensor.py:
  a counter that moves every 100 ms, an instant-power field or only a one-second average),
  read by the proxy's BackgroundSource on the schedule its real thread keeps: the counter
  no faster than its measured cost allows (3 ms a read: one read every 0.75 s), power
  samples at 20 Hz in between;

and the sampler's own 2 Hz tick, the backend's gauges scraped as the proxy's registry does
(when the engine exports them): every `scrape_s` (--backend-metrics-s), every
`fast_scrape_s` while requests may be waiting, and at once (within `fast_scrape_s` of the
last read) when a request opens with more in flight than the backend may run; and each
request's boundaries read at its own instant. The error is
the mean absolute difference of the kinds' shares of the dynamic energy, as the requests
were told, from the engine's Shapley truth.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from metering.accounting.band import BandTerms
from metering.accounting.report import Tokens
from metering.accounting.sampler import LEDGER_TICK_HZ
from metering.carbon.intensity import StaticIntensity
from metering.meter import Measurement, Meter, Plan
from metering.sources.background import BackgroundSource
from metering.sources.base import Reading
from metering.sources.nvml import NvmlGpuSource
from tests.support.clock import StepClock
from tests.support.fairness import kind_shares
from tests.support.fakes.batching_engine import Engine, EngineConfig, SimRequest
from tests.support.fakes.gpu_sensor import SimulatedNvml

LEAD_S = 3.0  # idle before the first request: the reader learns the counter's period
# A counter read's CPU cost around its median: p99 / p50 = exp(2.33 * sigma) = 16 / 3.
READ_COST_SIGMA = math.log(16.0 / 3.0) / 2.326
FAST_READ_COST_S = 3e-6  # the instant-power field
BACKEND = "sim"


@dataclass(frozen=True, slots=True)
class Sensor:
    kind: str = "h100"  # "perfect" or "h100"
    instant: str = "exact"  # h100: "exact", "1s-average" or "none"
    counter_period_s: float = 0.1
    counter_cost_s: float = 0.003  # CPU seconds of one counter read (the median)
    sample_hz: float = 20.0
    # Where the sensor's clocks stand against the requests' (a real sensor's are unrelated
    # to when requests arrive): `seed` draws the counter's phase, the power samples' phase
    # and each counter read's cost (a lognormal around the median, 16 ms at p99 for 3 ms,
    # as on an H100), which moves the reads' schedule as it does on a real host. seed None:
    # every phase 0 and every read the median (sample times line up with round arrivals).
    seed: int | None = 0


PERFECT = Sensor("perfect")
H100 = Sensor()


@dataclass(slots=True)
class Outcome:
    error: float
    shares: dict[str, tuple[float, float]]  # kind -> (told, truth)
    told_j: dict[str, float] = field(default_factory=dict)  # rid -> dynamic joules told
    conservation_j: float = 0.0  # |attributed + idle - measured| over the run
    meter: Meter | None = None  # for traces: its lanes' fits and rates
    # Scored requests: rid -> (how far the dynamic joules told are from the truth, over
    # the joules told; the band's relative half-width; whether the fit split it).
    bands: dict[str, tuple[float, float, bool]] = field(default_factory=dict)
    # Scored requests: rid -> the band's sources before scaling (for bench/band.py).
    terms: dict[str, BandTerms] = field(default_factory=dict)


class Truth:
    """The engine's GPU: idle plus each step's energy, spread evenly over the step."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.idle_w = engine.config.cost.idle_w

    def energy_at(self, t_s: float) -> float:
        return self.idle_w * max(0.0, t_s) + self.engine.dynamic_j_at(t_s - LEAD_S)

    def power_at(self, t_s: float) -> float:
        steps, t = self.engine.steps, t_s - LEAD_S
        i = bisect.bisect_right([s.start_s for s in steps], t) - 1
        if i >= 0 and steps[i].end_s > t:
            s = steps[i]
            return self.idle_w + s.energy_j / (s.end_s - s.start_s)
        return self.idle_w


class PerfectSource:
    name, method, domain = "gpu", "trace", "gpu"

    def __init__(self, truth: Truth) -> None:
        self.truth = truth

    def read(self, now_s: float) -> Reading:
        return Reading(self.truth.energy_at(now_s), self.truth.power_at(now_s), now_s)

    def close(self) -> None:
        return None


def payload_of(r: SimRequest) -> dict[str, object]:
    text = "x" * (4 * r.prompt_tokens)  # the proxy estimates ~4 characters a token
    if r.max_tokens == 0:
        return {"model": "m", "input": text}
    return {"model": "m", "messages": [{"role": "user", "content": text}]}


def run_metered(
    config: EngineConfig,
    requests: list[SimRequest],
    mode: str = "queue",
    *,
    sensor: Sensor = H100,
    gauges: bool = True,
    scrape_s: float = 5.0,
    fast_scrape_s: float = 0.25,
    warm: bool = True,
    stream: Callable[[SimRequest], bool] = lambda r: r.max_tokens > 0,
    scored: Callable[[SimRequest], bool] = lambda r: True,
) -> Outcome:
    """Serve `requests` through the meter; the error is over the `scored` ones (the others
    are warm-up traffic the fit learns from)."""
    engine = Engine(config)
    truth = Truth(engine)
    clock = StepClock()
    polls: list[tuple[float, int, str]] = []  # (due, order, what): the timeline's own events
    source: object
    rng = random.Random(sensor.seed)
    phased = sensor.seed is not None
    background: BackgroundSource | None = None
    session: SimulatedNvml | None = None
    if sensor.kind == "perfect":
        source = PerfectSource(truth)
    else:
        session = SimulatedNvml(
            truth.energy_at,
            truth.power_at,
            counter_period_s=sensor.counter_period_s,
            counter_phase_s=rng.uniform(0.0, sensor.counter_period_s) if phased else 0.037,
            instant=sensor.instant,
        )
        gpu = NvmlGpuSource(session, 0, start_s=0.0)  # type: ignore[arg-type]
        background = BackgroundSource(
            gpu, fast_interval_s=1.0 / sensor.sample_hz, clock=clock, start=False
        )
        source = background
        fast_phase_s = rng.uniform(0.0, 1.0 / sensor.sample_hz) if phased else 0.0
        heapq.heappush(polls, (fast_phase_s, 0, "full"))
        heapq.heappush(polls, (fast_phase_s + 1.0 / sensor.sample_hz, 1, "fast"))

    def read_cost_s() -> float:
        if not phased:
            return sensor.counter_cost_s
        return sensor.counter_cost_s * math.exp(READ_COST_SIGMA * rng.gauss(0.0, 1.0))

    meter = Meter.build(
        [source],  # type: ignore[list-item]
        [Plan(BACKEND)],
        StaticIntensity(0.0),
        idle_watts=truth.idle_w,
        clock=clock,
        attribution=mode,
    )
    if warm and config.max_running is not None and gauges:
        meter.learn(BACKEND, config.max_running, 1)  # seen full before, as in steady state
    heapq.heappush(polls, (1.0 / LEDGER_TICK_HZ, 2, "tick"))
    # The registry's read schedule (BackendRegistry.run_own_metrics): one read is planned
    # at a time; a wake-up may bring it forward (a plan superseded is skipped).
    scrape = {"last": -math.inf, "due": math.inf, "plan": 0.0}

    def plan_scrape(due_s: float) -> None:
        scrape["due"] = due_s
        scrape["plan"] += 1
        heapq.heappush(polls, (due_s, 3, f"scrape:{int(scrape['plan'])}"))

    def wake_scrape(_: str) -> None:
        due_s = max(clock.t_s, scrape["last"] + fast_scrape_s)
        if due_s < scrape["due"]:
            plan_scrape(due_s)

    if gauges:
        plan_scrape(0.0)
        meter.on_gauges_wanted = wake_scrape

    def advance(to_s: float) -> None:
        while polls and polls[0][0] < to_s:
            due, order, what = heapq.heappop(polls)
            clock.t_s = due
            if session is not None:
                session.now_s = due
            if what == "nudge":  # the thread woken by a boundary (BackgroundSource.nudge)
                assert background is not None
                if background.nudge_due_s is not None:
                    background.poll(due, full=False, cost_s=FAST_READ_COST_S)
            elif what in ("full", "fast"):
                assert background is not None
                full = what == "full"
                background.poll(due, full=full, cost_s=read_cost_s() if full else FAST_READ_COST_S)
                nxt = background.next_due_s(due, full=full)
                heapq.heappush(polls, (nxt, order, what))
            elif what == "tick":
                meter.sampler.tick()
                heapq.heappush(polls, (due + 1.0 / LEDGER_TICK_HZ, order, what))
            elif int(what.partition(":")[2]) == int(scrape["plan"]):  # a read still planned
                last = engine.steps[-1] if engine.steps else None
                # An engine that has not stepped yet shows its gauges at zero.
                meter.learn(BACKEND, last.running if last else 0, last.waiting if last else 0)
                scrape["last"] = due
                wanted = meter.gauges_wanted(BACKEND)
                plan_scrape(due + (fast_scrape_s if wanted else scrape_s))

    shifted = [
        SimRequest(r.rid, r.kind, r.arrival_s, r.prompt_tokens, r.max_tokens) for r in requests
    ]
    by_id = {r.rid: r for r in shifted}
    open_: dict[str, Measurement] = {}
    told: dict[str, float] = {}
    reports: dict[str, tuple[float, float, bool]] = {}  # rid -> (joules, band, fitted)
    terms: dict[str, BandTerms] = {}
    nudged_s: float | None = None  # the boundary sample last scheduled
    for ev in engine.run(shifted):
        t = ev.t_s + LEAD_S
        advance(t)
        clock.t_s = t
        if session is not None:
            session.now_s = t
        r = by_id[ev.rid]
        if ev.kind == "start":
            open_[r.rid] = meter.open(
                BACKEND, payload_of(r), stream=stream(r), embeddings=r.max_tokens == 0
            )
        elif ev.kind == "first_token" and stream(r):
            meter.first_token(open_[r.rid])
        elif ev.kind == "token" and stream(r):
            open_[r.rid].streamed()  # the relay counts each chunk of a stream
        elif ev.kind == "end":
            report = meter.close(
                open_.pop(r.rid),
                answered=True,
                request_id=r.rid,
                model="m",
                category="other",
                tokens=Tokens(r.prompt_tokens, r.generated, "backend"),
            )
            told[r.rid] = report.dynamic_j
            reports[r.rid] = (report.energy_j, report.band_rel or 0.0, "fitted" in report.basis)
            if report.band_terms is not None and scored(r):
                terms[r.rid] = report.band_terms
        if background is not None and background.nudge_due_s not in (None, nudged_s):
            nudged_s = background.nudge_due_s
            heapq.heappush(polls, (nudged_s, 4, "nudge"))
    # Let the sensor catch up with the end of the run, then check conservation.
    advance(clock.t_s + 2.0)
    clock.t_s += 2.0
    meter.sampler.read_all()
    ch = meter.sampler.ledger.channels[meter.sampler.states[0].source.name]
    conservation = abs(ch.attributed_j + ch.untracked_j + ch.idle_j - ch.measured_j)
    error, shares = kind_shares([r for r in shifted if scored(r)], told)
    bands = {
        r.rid: (
            abs(told[r.rid] - r.truth_j) / max(reports[r.rid][0], 1e-12),
            reports[r.rid][1],
            reports[r.rid][2],
        )
        for r in shifted
        if scored(r) and r.rid in reports
    }
    return Outcome(error, shares, told, conservation, meter, bands, terms)
