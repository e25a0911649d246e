"""A continuous-batching inference engine with a stated cost model, and the fair split of
its energy: the ground truth the proxy's attribution is judged against.

The engine (pure: no I/O, no clock; `run` walks virtual time step by step):
- requests arrive, wait in a FIFO queue and are admitted while fewer than `max_running`
  run (None: no limit);
- every step, each running request either prefills its prompt (at most `prefill_chunk`
  prompt tokens per step across all prefilling requests, oldest first; None: whole prompts
  in one step) or, once its prompt is done, decodes one token;
- a request's first token comes out with the step that finishes its prefill; it finishes
  after `max_tokens` tokens (an embeddings request after its prefill).

The cost model of one step (energy above idle, and its duration):

    E = fixed_j + prefill_j_per_token * P + decode_j_per_seq * D + kv_j_per_token * K
    t = fixed_s + prefill_s_per_token * P + decode_s_per_seq * D

P prompt tokens prefilled in the step, D sequences decoding, K the context tokens those
sequences attend over. The defaults are shaped like an 8B model on an H100: a decode step
is memory-bound (3.4 ms and 0.95 J above idle, the weights read once per step whatever
the batch), prefill compute-bound (8 µs and 5 mJ per prompt token).

The fair split is the Shapley value of each step's cost game: the variable terms are each
request's own (its prefill tokens, its decode, its context), and the fixed term, which
every subset of the step's requests incurs in full, is split equally among the requests in
the step. A request pays nothing for steps it is not in (waiting in the queue costs the
GPU nothing). What it leaves out: interference between requests (a long prefill slowing
the decoders' steps is charged to the prefill only through its own tokens), and energy
between steps (none here: the engine steps back to back while anything runs).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class CostModel:
    idle_w: float = 70.0
    fixed_j: float = 0.95
    fixed_s: float = 0.0034
    prefill_j_per_token: float = 0.005
    prefill_s_per_token: float = 8e-6
    decode_j_per_seq: float = 0.01
    decode_s_per_seq: float = 5e-5
    kv_j_per_token: float = 0.0


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_running: int | None = None
    prefill_chunk: int | None = None
    cost: CostModel = field(default_factory=CostModel)


@dataclass(slots=True)
class SimRequest:
    rid: str
    kind: str
    arrival_s: float
    prompt_tokens: int
    max_tokens: int  # 0: an embeddings request (prefill only)
    prefilled: int = 0
    generated: int = 0
    admitted_s: float | None = None
    first_token_s: float | None = None
    finished_s: float | None = None
    truth_j: float = 0.0  # its Shapley share of the dynamic energy
    token_times_s: list[float] = field(default_factory=list)

    @property
    def decoding(self) -> bool:
        return self.prefilled >= self.prompt_tokens


@dataclass(frozen=True, slots=True)
class Event:
    """What the proxy would see of a request: `start`, `first_token`, `token`, `end`."""

    t_s: float
    kind: str
    rid: str


@dataclass(frozen=True, slots=True)
class Step:
    start_s: float
    end_s: float
    energy_j: float  # above idle
    running: int
    waiting: int


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.queue: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.done: list[SimRequest] = []
        self.steps: list[Step] = []
        self._cum_end_s: list[float] = []  # end time of each step
        self._cum_j: list[float] = []  # dynamic energy up to each step's end

    def run(self, requests: list[SimRequest]) -> Iterator[Event]:
        """Serve `requests` (any order of arrival); yields the proxy-visible events in time
        order. Steps run back to back while anything is admitted; the engine idles until
        the next arrival otherwise."""
        pending = deque(sorted(requests, key=lambda r: r.arrival_s))
        now = 0.0
        while pending or self.queue or self.running:
            # Arrivals up to now join the queue.
            while pending and pending[0].arrival_s <= now:
                r = pending.popleft()
                self.queue.append(r)
                yield Event(r.arrival_s, "start", r.rid)
            self._admit(now)
            if not self.running:
                if pending:
                    now = max(now, pending[0].arrival_s)
                continue
            end, events = self._step(now)
            # Requests arriving during the step are seen before its results (time order);
            # they join the queue and are admitted at the next step.
            while pending and pending[0].arrival_s < end:
                r = pending.popleft()
                self.queue.append(r)
                yield Event(r.arrival_s, "start", r.rid)
            yield from events
            now = end

    def add(self, r: SimRequest) -> None:
        """A request arrives (for callers that step the engine themselves)."""
        self.queue.append(r)

    def step(self, now: float) -> tuple[float, list[Event]] | None:
        """Admit what fits and run one step from `now`: its end time and events, or None
        when nothing is admitted (for callers that step the engine in real time)."""
        self._admit(now)
        if not self.running:
            return None
        return self._step(now)

    def _admit(self, now: float) -> None:
        limit = self.config.max_running
        while self.queue and (limit is None or len(self.running) < limit):
            r = self.queue.popleft()
            r.admitted_s = now
            self.running.append(r)

    def _step(self, now: float) -> tuple[float, list[Event]]:
        cost = self.config.cost
        budget = self.config.prefill_chunk
        prefill: dict[str, int] = {}
        for r in self.running:  # oldest first: admission order
            if r.decoding:
                continue
            want = r.prompt_tokens - r.prefilled
            take = want if budget is None else min(want, budget)
            if take <= 0:
                continue
            prefill[r.rid] = take
            if budget is not None:
                budget -= take
        decoders = [r for r in self.running if r.decoding]
        tokens_p = sum(prefill.values())
        kv = sum(r.prompt_tokens + r.generated for r in decoders)
        energy = (
            cost.fixed_j
            + cost.prefill_j_per_token * tokens_p
            + cost.decode_j_per_seq * len(decoders)
            + cost.kv_j_per_token * kv
        )
        duration = (
            cost.fixed_s
            + cost.prefill_s_per_token * tokens_p
            + cost.decode_s_per_seq * len(decoders)
        )
        in_step = [r for r in self.running if r.rid in prefill or r.decoding]
        end = now + duration
        for r in in_step:
            own = (
                cost.prefill_j_per_token * prefill[r.rid]
                if r.rid in prefill
                else cost.decode_j_per_seq + cost.kv_j_per_token * (r.prompt_tokens + r.generated)
            )
            r.truth_j += cost.fixed_j / len(in_step) + own
        self.steps.append(Step(now, end, energy, len(self.running), len(self.queue)))
        events: list[Event] = []
        finished: list[SimRequest] = []
        for r in in_step:
            if r.rid in prefill:
                r.prefilled += prefill[r.rid]
                if r.decoding:
                    if r.max_tokens == 0:  # embeddings: done with the prompt
                        finished.append(r)
                        continue
                    # The step that completes the prompt samples the first token.
                    r.generated = 1
                    r.first_token_s = end
                    r.token_times_s.append(end)
                    events.append(Event(end, "first_token", r.rid))
            else:
                r.generated += 1
                r.token_times_s.append(end)
                events.append(Event(end, "token", r.rid))
            if r.max_tokens and r.generated >= r.max_tokens:
                finished.append(r)
        for r in finished:
            r.finished_s = end
            self.running.remove(r)
            self.done.append(r)
            events.append(Event(end, "end", r.rid))
        self._cum_end_s.append(end)
        self._cum_j.append((self._cum_j[-1] if self._cum_j else 0.0) + energy)
        return end, events

    def dynamic_j_at(self, t_s: float) -> float:
        """Dynamic energy drawn from time 0 to `t_s` (a step's energy spread evenly over
        it): what a perfect energy counter above idle would read."""
        i = bisect.bisect_left(self._cum_end_s, t_s)
        done = self._cum_j[i - 1] if i > 0 else 0.0
        if i < len(self.steps):
            s = self.steps[i]
            if t_s > s.start_s:
                done += s.energy_j * (t_s - s.start_s) / (s.end_s - s.start_s)
        return done

    def energy_between_j(self, t0: float, t1: float) -> float:
        """Dynamic energy drawn in [t0, t1] (each step's energy spread evenly over it)."""
        total = 0.0
        for s in self.steps:
            lo, hi = max(t0, s.start_s), min(t1, s.end_s)
            if hi > lo:
                total += s.energy_j * (hi - lo) / (s.end_s - s.start_s)
        return total
