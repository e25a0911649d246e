"""The meter: the request path's one door into metering.

A request is `open`ed when it is sent to its backend, told its `first_token` when the
first streamed token shows (prefill is over), and `close`d once, when it ends however it
ends; `close` returns its `EnergyReport`. The registry hands the backend's own running and
waiting counts to `learn` as soon as it reads them: the queue model learns from them, and
requests running beyond the proxy's own are work it did not send, whose energy goes to the
backend's untracked account (`untracked_joules`). Everything under it is the accounting
(metering/accounting/): the sampler and its ledger, the attribution weights, the queue
model of each backend, the device groups, the report. Nothing here does HTTP.

Every call is O(1) in the number of requests in flight (the ledger's virtual time), and
none waits on a sensor: blocking sources are read on threads of their own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from metering.accounting.attribution import MODEL, Attribution
from metering.accounting.band import (
    SCALES,
    BandTerms,
    band_rel,
    band_terms,
    coefficient_log_sds,
    sensor_class,
)
from metering.accounting.cost_model import (
    DEFAULT_DECODE_TOKENS_PER_S,
    TRUST_INTERVALS,
    Coefficients,
    steps_seen,
)
from metering.accounting.groups import bind_channels, gpu_share, time_channel
from metering.accounting.ledger import Ledger, SourceShare
from metering.accounting.prompt_text import prompt_tokens_estimate
from metering.accounting.queue_model import WAITING, EngineQueue, Flight, WorkPrice
from metering.accounting.report import (
    DEFAULT_ENDPOINT,
    EnergyReport,
    Timings,
    Tokens,
    build_report,
)
from metering.accounting.sampler import LEDGER_TICK_HZ, Sampler
from metering.carbon.intensity import IntensityProvider
from metering.carbon.sci import (
    DEFAULT_LIFESPAN_YEARS,
    Embodied,
    embodied_for_host,
    embodied_g,
)
from metering.lane import Lane, Measurement, Plan, cost_model_view
from metering.sources.background import DEFAULT_COUNTER_PERIOD_S
from metering.sources.base import PowerSource
from metering.sources.hardware import describe_hardware

__all__ = ["LEDGER_TICK_HZ", "Lane", "Measurement", "Meter", "Plan"]

COST_MODEL_VERSION = "cost-v1"  # the form of cost_model.py's model and its fit
FIT_EVERY_S = 5.0  # how often each backend's cost model is refitted (on the sampler's tick)

log = logging.getLogger("energy_proxy.meter")


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
        embodied: Embodied | None = None,
        fit_in_thread: bool = False,
    ) -> None:
        self.sampler = sampler
        self.fit_in_thread = fit_in_thread
        self.intensity = intensity
        self.attribution = attribution or Attribution()
        self.pue = pue
        # None: the default for the hardware measured (carbon/sci.py, embodied_for_host).
        gpus = sum(1 for domain in sampler.domains.values() if domain == "gpu")
        self.embodied = embodied or embodied_for_host(gpus, None, DEFAULT_LIFESPAN_YEARS)
        self._lanes = dict(lanes)
        for lane in self._lanes.values():
            self._price(lane)
            self._describe(lane)
        sampler.tick_listeners.append(self.tick)
        # Told a backend's name when a request opens with more in flight to it than it may
        # run at once (the registry reads its gauges at once then, and often after).
        self.on_gauges_wanted: Callable[[str], None] | None = None
        # The band's calibrated factors, by the state a request is split in (band.py).
        self.band_scales = SCALES

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
        attribution: str = MODEL,
        pue: float = 1.0,
        embodied: Embodied | None = None,
        fit_in_thread: bool = False,
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
                EngineQueue(
                    configured=p.max_running,
                    chunk_configured=(
                        None if p.prefill_chunk_tokens is None else float(p.prefill_chunk_tokens)
                    ),
                ),
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
            fit_in_thread=fit_in_thread,
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
        prompt_est: float | None = None,
    ) -> Measurement:
        """A request is sent to `backend` now. `serial`: the backend runs one request at a
        time (llama-cpp-python), a capacity known without its metrics."""
        lane = self.lane(backend)
        queue = lane.queue
        if serial and queue.capacity is None:
            queue.configured = queue.capacity = 1
            self._describe(lane)
        # The prompt's size matters where a request's prefill can be seen, and in `model`
        # mode, where a non-streamed answer's prefill is spread over its steps.
        sized = stream or embeddings or self.attribution.mode == MODEL
        if prompt_est is None or not sized:  # `prompt_est`: the caller estimated it already
            prompt_est = prompt_tokens_estimate(payload) if sized else 1.0
        flight = Flight(prompt_est, stream=stream, embeddings=embeddings)
        weight = self.attribution.start(flight, queue, self.sampler.clock())
        ticket, t0_s = self.sampler.start(
            weight, lane.channels, flight.eq, prefill=flight.prefill_work
        )
        flight.t0_s = t0_s
        untracked = lane.untracked
        m = Measurement(lane, flight, ticket, t0_s)
        m.untracked_at_open, m.untracked_episodes = untracked.count > 0, untracked.episodes
        if flight.phase != WAITING:
            m.admitted_s = t0_s
        flight.handle = m
        lane.open_starts[id(m)] = t0_s
        # Read the gauges at once when requests may wait, or when the last reading, taken
        # while the proxy was idle, showed work it did not send (confirm it, or not).
        if self.on_gauges_wanted is not None and (queue.may_queue() or untracked.unconfirmed):
            self.on_gauges_wanted(backend)
        return m

    def gauges_wanted(self, backend: str) -> bool:
        """Whether the backend's gauges are worth reading often now: its requests in
        flight may be more than it runs at once (`EngineQueue.may_queue`), or work around
        the proxy was seen lately while the proxy has requests of its own in flight."""
        lane = self._lanes.get(backend)
        if lane is None:
            return False
        suspect = lane.open_starts and self.sampler.clock() < lane.untracked.suspect_until_s
        return lane.queue.may_queue() or bool(suspect)

    def reached(self, m: Measurement) -> None:
        """The backend began its answer to a streamed request: it has the request (the
        steps of its prefill are counted from here: attribution.py)."""
        self.attribution.reached(m.flight, m.lane.queue, self.sampler.clock())

    def first_token(self, m: Measurement) -> None:
        """Its first token came out: prefill is over (and it was admitted), it decodes."""
        now_s = self.sampler.clock()
        queue, attribution = m.lane.queue, self.attribution
        if m.first_token_s is None:
            changed = attribution.infer(m.flight, queue, now_s)
            if changed:
                self._describe(m.lane)
            displaced = attribution.make_room(m.flight, queue)
            if displaced is not None:  # it ran in that one's place: swap what each owes
                self.sampler.exchange(m.ticket, displaced.handle.ticket)
                changed.append((displaced, 0.0))
            if changed:
                self._admitted(changed, now_s)
        weight = attribution.first_token(m.flight, queue, now_s)
        joined = attribution.step_ended(queue, now_s)
        if joined:
            self._admitted(joined, now_s)
        if m.first_token_s is None:
            m.first_token_s = now_s
            if m.admitted_s is None:  # it ran although the queue model held it waiting
                m.admitted_s = m.t0_s
        if weight is not None:
            self.sampler.reweigh(m.ticket, weight, m.flight.eq, m.flight.prefill_work)

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
        timings: Timings | None = None,
        endpoint: str = DEFAULT_ENDPOINT,
    ) -> EnergyReport:
        """It ended (`answered`: with a success the client received). Closes it once;
        later calls return the same report. `timings`: its phases as the backend
        reported them, which place its work in time for the fit. `endpoint`: the API it
        called (`chat`, `completions`, `embeddings`, `responses`, `messages`, `audio`,
        `rerank`, `score`, `pooling`, ...), a label of its report and record."""
        if m.report is not None:
            return m.report
        attribution, sampler, queue = self.attribution, self.sampler, m.lane.queue
        # Answered while the queue model held it waiting: served out of arrival order, in
        # the place of a request the model admitted (which has not started, then).
        instead = attribution.ran_instead(m.flight, queue) if answered else None
        # An answer whose prefill was seen to its end (embeddings) ends its step.
        step_over = m.flight.prefill_work
        shares, t1_s = sampler.finish(m.ticket, instead.handle.ticket if instead else None)
        # Its place in the backend's queue model goes to the oldest waiting request.
        self._admitted(attribution.finish(m.flight, queue, t1_s), t1_s)
        if step_over:
            self._admitted(attribution.step_ended(queue, t1_s), t1_s)
        m.lane.open_starts.pop(id(m), None)
        m.lane.untracked.ended(t1_s)
        self._learn_work(m, t1_s, tokens, timings)
        # Shares of a time channel are the request's share of busy seconds (carbon/sci.py).
        busy_s = sum(s.energy_j for s in shares if s.name.startswith("time:"))
        domains = sampler.domains
        terms = self._band_terms(m, shares, t1_s, tokens)
        m.report = build_report(
            request_id=request_id,
            model=model,
            category=category,
            duration_s=t1_s - m.t0_s,
            tokens=tokens or Tokens(None, 0, "proxy"),
            shares=shares,
            domains=domains,
            methods=sampler.methods_for([c for c in m.lane.channels if c in domains]),
            intensity=(m.lane.intensity or self.intensity).current(),
            pue=self.pue,
            embodied_g=embodied_g(self.embodied, busy_s, m.lane.gpu_share, 1.0),
            embodied_basis=self.embodied.basis,
            attribution=attribution.mode,
            client_request_id=client_request_id,
            band_rel=band_rel(terms, self.band_scales),
            basis=m.lane.basis + ("backend" if timings is not None else "proxy"),
            endpoint=endpoint,
            shared_with_untracked=m.lane.untracked.shared_with(
                m.untracked_at_open, m.untracked_episodes
            ),
            band_terms=terms,
        )
        return m.report

    # --- uncertainty ----------------------------------------------------------------------

    def _band_terms(
        self, m: Measurement, shares: Sequence[SourceShare], t1_s: float, tokens: Tokens | None
    ) -> BandTerms:
        """The sources of error of a request's joules (accounting/band.py): its
        sensitivities to the coefficients in use and how uncertain each is, the sensor's
        resolution for its time, the fit's residual, and how long it waited while the
        queue's capacity was not known for sure."""
        lane, domains = m.lane, self.sampler.domains
        joules = dynamic_j = exposure_j = sens_f = sens_p = sens_d = 0.0
        for s in shares:
            if s.name in domains:
                joules += s.energy_j
                dynamic_j += s.dynamic_j
                exposure_j += s.exposure_j
                sens_f += s.sensitivity_j[0]
                sens_p += s.sensitivity_j[1]
                sens_d += s.sensitivity_j[2]
        fit = lane.fit
        duration_s = t1_s - m.t0_s
        price = fit.in_use
        prompt = tokens.prompt if tokens is not None and tokens.prompt else m.flight.prompt_tokens
        made = tokens.completion if tokens is not None and tokens.completion else 0
        own_work_j = price.prefill_j_per_token * prompt + price.decode_j_per_token * made
        started_s = m.first_token_s if m.first_token_s is not None else m.admitted_s
        waited_s = 0.0
        if started_s is not None:
            waited_s = max(0.0, started_s - m.t0_s - lane.rates.prefill_window_s)
        return band_terms(
            joules=joules,
            sensitivity_j=(sens_f, sens_p, sens_d),
            log_sds=lane.log_sds,
            own_work_j=own_work_j,
            period_s=lane.period_s,
            duration_s=duration_s,
            residual_rel=fit.band_in_use,
            waited_s=waited_s,
            queue_known=lane.queue.capacity_source() in ("configured", "learnt"),
            exposure_j=exposure_j,
            dynamic_j=dynamic_j,
            fitted=fit.trusted,
            sensor=lane.sensor,
            early=fit.intervals_used < TRUST_INTERVALS,
        )

    def _describe(self, lane: Lane) -> None:
        """Refresh what a lane's answers say of their split (at each tick and each read
        of the backend's gauges, not per request): its sensors' counter period and the
        `attribution_basis`: the cost model's version and whether it is fitted on this
        host or still the defaults, where the queue's capacity came from, whose timings."""
        period_s = window_s = 0.0
        for name in lane.energy_channels:
            st = self.sampler.by_name.get(name)
            if st is None:
                continue
            schedule = getattr(st.source, "schedule", None)
            if schedule is not None:  # read in the background: its period, once learnt
                period_s = max(period_s, float(schedule.period_s or DEFAULT_COUNTER_PERIOD_S))
            window_s = max(window_s, float(getattr(st.source, "power_window_s", 0.0) or 0.0))
        lane.period_s, lane.sensor = max(period_s, window_s), sensor_class(period_s, window_s)
        if self.attribution.mode != MODEL:
            model = "no cost model"
        else:
            model = f"{COST_MODEL_VERSION} {'fitted' if lane.fit.trusted else 'defaults'}"
        capacity = lane.queue.capacity_source()
        lane.basis = f"{model}; queue capacity {capacity}; timings "  # + whose, per request

    # --- what the backends tell ------------------------------------------------------------

    def learn(self, backend: str, running: float | None, waiting: float | None) -> None:
        """The backend's own running/waiting counts were just read: its queue model learns
        the capacity, and requests it now holds waiting (or admits) change weight; what
        runs beyond the proxy's own requests in flight is its untracked work."""
        lane = self.lane(backend)
        now_s = self.sampler.clock()
        self._admitted(self.attribution.observe(lane.queue, running, waiting), now_s)
        # The proxy's own count in flight (every open measurement of the lane), not the
        # queue model's split of it into running and waiting.
        inflight = len(lane.open_starts)
        self._set_untracked(lane, lane.untracked.read(now_s, running, inflight))
        self._describe(lane)

    # --- work the proxy did not send ----------------------------------------------------

    def _set_untracked(self, lane: Lane, count: int) -> None:
        """The lane's untracked account now stands for `count` running requests: its
        ticket is opened, reweighed or closed (its joules kept in `closed_j`)."""
        u = lane.untracked
        if count == u.count:
            return
        if u.count == 0:
            u.episodes += 1
        u.count = count
        if count > 0:
            u.seen_since_tick = True
            weight, eq = self._untracked_weight(lane)
            if u.ticket is None:
                u.ticket, _ = self.sampler.start(weight, lane.channels, eq, untracked=True)
            else:
                self.sampler.reweigh(u.ticket, weight, eq)
        elif u.ticket is not None:
            shares, _ = self.sampler.finish(u.ticket)
            u.closed_j += self._energy_j(shares)
            u.ticket = None

    def _untracked_weight(self, lane: Lane) -> tuple[float, float]:
        """The weight and equal share of the lane's untracked account: its count of
        running requests, each weighed as a decoding request under the current mode."""
        weight, eq = self.attribution.decoding_weight(lane.queue)
        n = lane.untracked.count
        return n * weight, n * eq

    def _reweigh_untracked(self, lane: Lane) -> None:
        """The weight of a decoding request changed (the cost model was refitted)."""
        ticket = lane.untracked.ticket
        if ticket is None or not ticket.shares:
            return
        weight, eq = self._untracked_weight(lane)
        share = ticket.shares[0]
        if (weight, eq) != (share.weight, share.eq):
            self.sampler.reweigh(ticket, weight, eq)

    def _forget_stale_untracked(self, lane: Lane, now_s: float) -> None:
        """The gauges stopped coming: what they last said no longer holds."""
        u = lane.untracked
        if u.stale(now_s):
            u.last_read_s = None
            self._set_untracked(lane, 0)

    def _energy_j(self, shares: Sequence[SourceShare]) -> float:
        """Joules in `shares`, over the energy sources (not the time channels)."""
        domains = self.sampler.domains
        return sum(s.energy_j for s in shares if s.name in domains)

    def untracked_joules(self, backend: str) -> float:
        """Joules the backend drew for work the proxy did not send, since the start
        (cumulative, up to the last reading of its sources; a read that changes nothing)."""
        lane = self._lanes.get(backend)
        if lane is None:
            return 0.0
        u = lane.untracked
        open_j = self._energy_j(Ledger.owed(u.ticket)) if u.ticket is not None else 0.0
        return u.closed_j + open_j

    def untracked_requests(self, backend: str) -> int:
        """Requests the backend runs now that the proxy did not send, as its gauges last
        said (0 when it has none, or they are not read)."""
        lane = self._lanes.get(backend)
        return 0 if lane is None else lane.untracked.count

    def _admitted(self, changed: list[tuple[Flight, float]], now_s: float) -> None:
        """Weights the queue model changed (admitted, or sent back to waiting)."""
        for flight, weight in changed:
            m: Measurement = flight.handle
            self.sampler.reweigh(m.ticket, weight, flight.eq, flight.prefill_work)
            if flight.phase != WAITING and m.admitted_s is None:
                m.admitted_s = now_s

    # --- the cost model -----------------------------------------------------------------

    def _learn_work(
        self, m: Measurement, t1_s: float, tokens: Tokens | None, timings: Timings | None
    ) -> None:
        """What a finished request did, and when, for its backend's fit and rates (queued
        for the next tick: the request path only appends). The backend's own timings,
        where it reported them, place its prefill and decode (counted back from its end,
        within its time in flight); else the proxy's view: admission and first token."""
        start_s = m.admitted_s if m.admitted_s is not None else m.t0_s
        first_s = m.first_token_s
        if timings is not None and timings.decode_s is not None:
            m.lane.timed += 1
            first_s = max(m.t0_s, t1_s - timings.decode_s)
            if timings.prefill_s is not None:
                start_s = max(m.t0_s, first_s - timings.prefill_s)
        prompt = float(tokens.prompt) if tokens and tokens.prompt else m.flight.prompt_tokens
        generated = tokens.completion if tokens else 0
        m.lane.pending_work.append((start_s, first_s, t1_s, prompt, generated))

    def _take_work(self, lane: Lane) -> None:
        work, lane.pending_work = lane.pending_work, []
        for start_s, first_s, t1_s, prompt, generated in work:
            if first_s is not None:
                split_s = first_s
                lane.rates.observe(split_s - start_s, t1_s - split_s, generated)
            else:  # no first token seen: its prefill is taken to last a typical window
                split_s = min(t1_s, start_s + lane.rates.prefill_window_s)
                lane.rates.observe_nonstream(generated)
            lane.fit.work(start_s, split_s, prompt=prompt)
            lane.fit.work(split_s, t1_s, decode=float(generated))

    def tick(self, now_s: float) -> None:
        """The sampler's periodic tick: each backend's interval since the last one goes to
        its fit, which is refitted every FIT_EVERY_S; then the weights follow the model."""
        channels = self.sampler.ledger.channels
        for lane in self._lanes.values():
            # Every lane's queue of finished work is emptied, even one without a time
            # channel to fit against (a backend no plan named): it must not grow.
            self._take_work(lane)
            self._forget_stale_untracked(lane, now_s)
            self._admitted(self.attribution.stalled(lane.queue, now_s), now_s)
            # The interval's energy is all known work only if nothing untracked ran in it.
            untracked = lane.untracked
            clean = not untracked.seen_since_tick
            untracked.seen_since_tick = untracked.count > 0
            busy_name = lane.time_channel
            if busy_name is None:
                continue
            dyn_j = sum(channels[c].dynamic_j for c in lane.energy_channels if c in channels)
            busy_s = channels[busy_name].attributed_j
            queue = lane.queue
            queue.advance_decoders(now_s)
            tick = (now_s, dyn_j, busy_s, float(queue.streamed), queue.decoder_s, queue.decoded_s)
            if lane.last_tick is not None:
                t0_s, dyn0_j, busy0_s, streamed0, decoder0_s, decoded0_s = lane.last_tick
                steps = steps_seen(
                    tick[3] - streamed0, tick[4] - decoder0_s, tick[5] - decoded0_s,
                    busy_s - busy0_s,
                )  # fmt: skip
                lane.fit.measured(
                    t0_s, now_s, dyn_j - dyn0_j, busy_s - busy0_s, clean=clean, steps=steps
                )
            lane.last_tick = tick
            if now_s >= lane.next_fit_s and not lane.fitting:
                lane.next_fit_s = now_s + FIT_EVERY_S
                oldest_s = min(lane.open_starts.values(), default=now_s)
                rows = lane.fit.rows(oldest_s)
                if rows is not None:
                    if self.fit_in_thread:
                        # Some milliseconds of arithmetic: off the event loop.
                        lane.fitting = True
                        threading.Thread(
                            target=self._refit, args=(lane, rows, now_s), daemon=True
                        ).start()
                    else:
                        self._refit(lane, rows, now_s)
            self._price(lane)
            self._describe(lane)

    def _refit(
        self,
        lane: Lane,
        rows: tuple[list[tuple[float, float, float]], list[float]],
        now_s: float,
    ) -> None:
        try:
            lane.fit.refit(rows, now_s)
            lane.fitted_wall_s = time.time()
        except Exception:  # a fit that fails keeps the last coefficients; the split goes on
            log.exception("cost model fit failed; keeping the last coefficients")
        finally:
            lane.fitting = False

    def _price(self, lane: Lane) -> None:
        """Set the lane's weights from its cost model: the fixed cost per step shared by
        the running requests (the ledger's `fixed_w`), each one's own work per step."""
        if self.attribution.mode != MODEL:
            return
        fit = lane.fit
        c: Coefficients = fit.in_use
        lane.log_sds = coefficient_log_sds(
            fit.trusted, c.as_tuple(), fit.std_errors, fit.identified
        )
        steps_per_s = max(1e-6, lane.rates.decode_tokens_per_s)
        lane.queue.price = WorkPrice(
            c.prefill_j_per_token,
            c.decode_j_per_token,
            lane.rates.nonstream_tokens,
            1.0 / steps_per_s,
        )
        # The fit's F is watts at the default step rate (cost_model.py): per step, F / it.
        fixed_j_per_step = c.fixed_w / DEFAULT_DECODE_TOKENS_PER_S
        channels = self.sampler.ledger.channels
        for name in lane.channels:
            if name in channels:
                channels[name].fixed_w = fixed_j_per_step
        self._reweigh_untracked(lane)

    # --- for readers ------------------------------------------------------------------------

    def cost_models(self) -> dict[str, dict[str, object]]:
        """Each planned backend's cost model as /readyz and the metrics show it."""
        return {
            name: cost_model_view(lane, COST_MODEL_VERSION) for name, lane in self._lanes.items()
        }

    def lane(self, backend: str) -> Lane:
        """The lane of `backend`; one not planned draws from every source."""
        lane = self._lanes.get(backend)
        if lane is None:
            lane = self._lanes[backend] = Lane(tuple(self.sampler.by_name))
            self._price(lane)
            self._describe(lane)
        return lane

    def hardware(self) -> str:
        """What the energy is measured on, for labels: the devices and their methods."""
        return describe_hardware(
            (st.source.name, str(getattr(st.source, "hardware", "") or ""), st.source.method)
            for st in self.sampler.states
        )
