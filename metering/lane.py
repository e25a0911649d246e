"""One backend as the meter sees it (`Lane`), what the meter is told of it (`Plan`), and
one request being measured (`Measurement`); the view of a lane's cost model that /readyz
and the metrics show. Data only: the meter (metering/meter.py) does the work."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from metering.accounting.band import EXACT, PRIOR_LOG_SD
from metering.accounting.cost_model import TERMS, CostFit, Rates
from metering.accounting.ledger import Ticket
from metering.accounting.queue_model import DECODE, EngineQueue, Flight
from metering.accounting.report import EnergyReport
from metering.accounting.untracked import UntrackedWork
from metering.carbon.intensity import IntensityProvider


@dataclass(frozen=True, slots=True)
class Plan:
    """What the meter needs to know of one backend: its name, the GPU indices it runs on
    (None: the GPUs no backend claims), the most requests it runs at once and the prompt
    tokens it prefills in one step (chunked prefill), if known."""

    name: str
    gpus: Sequence[int] | None = None
    max_running: int | None = None
    prefill_chunk_tokens: int | None = None


@dataclass(slots=True)
class Lane:
    """One backend as the meter sees it: the channels its requests draw from (its GPUs,
    the host-wide sources and its time channel), its share of the host's GPUs (SCI's
    RR/ToR), the model of its admission queue, and its cost model (cost_model.py) with
    the rates and the requests in flight it is fitted from."""

    channels: tuple[str, ...]
    gpu_share: float = 1.0
    queue: EngineQueue = field(default_factory=EngineQueue)
    fit: CostFit = field(default_factory=CostFit)
    rates: Rates = field(default_factory=Rates)
    # Request starts in flight (the fit uses only intervals before the oldest).
    open_starts: dict[int, float] = field(default_factory=dict)
    # At the last tick: (t, dynamic J, busy s, tokens streamed, stream-seconds decoding,
    # seconds any stream decoded).
    last_tick: tuple[float, float, float, float, float, float] | None = None
    next_fit_s: float = 0.0
    fitted_wall_s: float | None = None  # unix time of the last fit
    fitting: bool = False  # a fit is running on its thread
    # Finished requests' work, (start, first token or None, end, prompt, generated), taken
    # into the fit at the next tick: the request path only appends.
    pending_work: list[tuple[float, float | None, float, float, int]] = field(default_factory=list)
    # The time within which its sources place energy (the longest counter period, or power
    # averaging window, among them) and their class (band.py `sensor_class`).
    period_s: float = 0.0
    sensor: str = EXACT
    # How unsure the log of each coefficient in use is (band.py), set with the prices.
    log_sds: tuple[float, float, float] = (PRIOR_LOG_SD, PRIOR_LOG_SD, PRIOR_LOG_SD)
    basis: str = ""  # what its split rests on now (the energy object's attribution_basis)
    timed: int = 0  # finished requests whose backend reported their phases (Timings)
    untracked: UntrackedWork = field(default_factory=UntrackedWork)  # work it did not send
    # Its own grid intensity (a backend in another zone); None: the meter's.
    intensity: IntensityProvider | None = None

    @property
    def energy_channels(self) -> tuple[str, ...]:
        return tuple(c for c in self.channels if not c.startswith("time:"))

    @property
    def time_channel(self) -> str | None:
        return next((c for c in self.channels if c.startswith("time:")), None)


@dataclass(slots=True, eq=False)
class Measurement:
    """One request being measured: from `Meter.open` to `Meter.close`."""

    lane: Lane
    flight: Flight
    ticket: Ticket
    t0_s: float
    admitted_s: float | None = None  # when the queue model let it run
    first_token_s: float | None = None
    report: EnergyReport | None = None
    # Its lane's untracked account when it opened: whether work the proxy did not send
    # ran then, and how many times such work had begun (a later start shared with it).
    untracked_at_open: bool = False
    untracked_episodes: int = 0

    def first_token_wait_s(self) -> float | None:
        """From its start to its first streamed token (None: none was seen)."""
        return None if self.first_token_s is None else max(0.0, self.first_token_s - self.t0_s)

    @property
    def decoding(self) -> bool:
        """Its first token has been seen (the hot path's check before `first_token`)."""
        return self.flight.phase == DECODE

    def streamed(self, tokens: int = 1) -> None:
        """It streamed `tokens` more after its first (the relay, at each chunk that
        carries any): one a step of its backend, which counts the steps the cost model's
        fit sees in each interval (cost_model.steps_seen)."""
        self.lane.queue.streamed += tokens


def cost_model_view(lane: Lane, version: str) -> dict[str, object]:
    """A lane's cost model as /readyz and the metrics show it."""
    c, fit, rates = lane.fit.coefficients, lane.fit, lane.rates
    return {
        "version": version,
        "fixed_w": c.fixed_w,
        "prefill_j_per_token": c.prefill_j_per_token,
        "decode_j_per_token": c.decode_j_per_token,
        # Each coefficient's standard error from the intervals alone, and whether they
        # identify it (else it is held at its default): cost_model.identify.
        "std_errors": dict(zip(TERMS, fit.std_errors, strict=True)),
        "identified": dict(zip(TERMS, fit.identified, strict=True)),
        "fitted_at": lane.fitted_wall_s,
        "in_use": "fitted" if fit.trusted else "defaults",
        "intervals": fit.intervals_used,
        "band_rel": fit.band_in_use,
        "fit_band_rel": fit.band_rel,
        "defaults_band_rel": fit.defaults_band_rel,
        "decode_tokens_per_s": rates.decode_tokens_per_s,
        "prefill_window_s": rates.prefill_window_s,
        "queue_capacity": lane.queue.capacity,
        "queue_capacity_source": lane.queue.capacity_source(),
        "prefill_chunk_tokens": lane.queue.chunk_tokens,
        "prefill_chunk_source": lane.queue.chunk_source(),
        "timed_requests": lane.timed,
    }
