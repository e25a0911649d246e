"""How much of each energy interval a request in flight is charged: its weight, over time.

The ledger (ledger.py) splits the energy of every interval among the requests in flight
in proportion to their weights; this module decides the weights. Pure: no I/O, no clock.
Four modes (`--attribution`):

`model` (the default). As `queue` below for who runs and who waits, with the weights of
the running requests from the backend's cost model fitted on this host (cost_model.py):
each running request shares the fixed cost of each step equally with the others running
(the ledger's `eq` part) and pays its own work in the step, `c_prefill * prompt tokens`
(on an engine that prefills in chunks, the part of the chunk it holds: `_per_step`)
while it prefills and `c_decode` while it decodes (`WorkPrice`, set by the meter from the
fit): the Shapley split of a step, applied over time.

A request that arrives while another's seen prefill (streamed, or embeddings) has been
under way for more than a step is not in the step the engine is running (a long
prefill's step): it weighs 0 (`NEXT_STEP`) until that step ends, which the next first
token or embeddings answer shows, and then prefills. One that arrives within a step of
the prefill's start shares its step (a burst).

`queue`. A continuous-batching engine admits a bounded number of requests
(vLLM's max_num_seqs, TGI's batch) and queues the rest; a request waiting in the queue
costs the GPU nothing. The proxy keeps a model of each backend's queue: FIFO admission
under a capacity read from the backend's own metrics (when it reports requests waiting,
the ones running are its capacity: vLLM `num_requests_running`/`num_requests_waiting`,
TGI `tgi_batch_current_size`/`tgi_queue_size`, llama.cpp `requests_processing`/
`requests_deferred`), or configured per backend (`max_running`); unknown means no limit.
A request the model holds in the queue weighs 0; when a running one ends, the oldest
waiting one is admitted; a request whose first token arrives while the model holds it
waiting is running after all (the capacity was larger: raised); one that ends with an answer
while the model holds it waiting was served out of order, and takes over the share of the
newest admitted request that has shown no first token (`ran_instead`). A running request weighs

    1 + prompt_tokens / PREFILL_TOKENS_PER_UNIT   while in prefill (until its first token),
    1                                             while decoding,

that is, every running sequence's equal share of a step's fixed cost (the weights, read
once per step whatever the batch) plus, in prefill, its compute-bound prompt work. The
constant 100 is calibrated against the engine simulator's H100-shaped cost model
(tests/support/fakes/batching_engine.py: a 3.4 ms decode step of 0.95 J above idle, 5 mJ per
prompt token) and checked across cost models from half to twice those figures
(bench/fairness.py). Non-streaming chat/completions show no first token, so they weigh
1 once running (their prefill under-weighted, as in `tokens`); embeddings are all prefill.
In `model` mode a non-streamed answer's prefill is spread over the steps it is expected
to run (`WorkPrice.amortize_steps`): its decode price plus its prompt's price over them.

`tokens` (the first version's default). No queue: a request weighs its prompt tokens from
its start to its first streamed token (waiting included, which overcharges requests that
queue), then 1.

`equal`. Every request in flight weighs 1.

Every event is O(1): arrival, first token and end touch the request itself and at most
the one request admitted in its place (more only when the capacity grows). On an engine
that prefills in chunks, a prefill that ends while holding part of the chunk shares it
again among the prompts that get a part (`Attribution._reallot`).
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from metering.accounting.cost_model import (
    DEFAULT_DECODE_J_PER_TOKEN,
    DEFAULT_DECODE_TOKENS_PER_S,
    DEFAULT_NONSTREAM_TOKENS,
    DEFAULT_PREFILL_J_PER_TOKEN,
)

MODEL = "model"
QUEUE = "queue"
TOKENS = "tokens"
EQUAL = "equal"
MODES = (MODEL, QUEUE, TOKENS, EQUAL)
QUEUED_MODES = (MODEL, QUEUE)  # the modes that keep a model of the backend's queue

PREFILL_TOKENS_PER_UNIT = 100.0
# A decoding sequence is one unit of a step's work: one token per step, whatever its prompt.
DECODE_WEIGHT = 1.0

WAITING, PREFILL, DECODE = "waiting", "prefill", "decode"
# Admitted, but the engine is in a step it cannot join: another request's prefill, seen
# (streamed, or embeddings), is under way. It joins at the step's end, which the next
# first token (or an embeddings answer) shows: `model` mode.
NEXT_STEP = "next step"

# Capacity from the answers alone (no gauges): a first token that comes within this
# fraction of the request's time in flight after another request ended was an admission
# into the place that end freed; INFER_EVIDENCE of them make the queue model limit.
FOLLOW_FRACTION = 0.25
INFER_EVIDENCE = 2

# The engine's chunk, from the streams (`ChunkEvidence`): prompts of at least
# CHUNK_MIN_PROMPT tokens whose prefill is counted in steps where streams decoded through
# at least CHUNK_COVERED of it; CHUNK_EVIDENCE of them that took CHUNK_MIN_STEPS steps or
# more make the split price prefill by the chunk.
CHUNK_MIN_PROMPT = 256.0
CHUNK_COVERED = 0.9
CHUNK_MIN_STEPS = 3.0
CHUNK_EVIDENCE = 3
CHUNK_KEPT = 32
CHUNK_CONTRADICTS = 1.5  # a prompt this many chunks in a step or two says there is none


@dataclass(slots=True)
class ChunkEvidence:
    """What streamed prompts showed of the engine's chunk: for each prompt whose
    prefill took CHUNK_MIN_STEPS steps or more (counted by the tokens the decoding
    streams streamed meanwhile, one a step each), the prompt tokens the engine
    prefilled a step meanwhile: its own and those of the prompts whose prefill ended
    inside its window (an engine shares its budget oldest first: a prompt behind others
    takes their steps too). A prompt of P tokens alone in chunks of C takes
    n = ceil(P / C) steps, and the count is n + 1 more often than not (the step under
    way when it was admitted streams its tokens inside its window), n at times (its
    last step's tokens race its first token): tokens / (count - 1) is what the engine
    prefilled a step, and the chunk is the median of the last CHUNK_KEPT (a few that
    waited while the model took them to run do not move it). A whole-prompt engine's
    prefill counts a step or two; where more are counted because prompts ended inside
    the window, the tokens a step come out above the prompts' own size, which is no
    chunk; a prompt that waited unseen (no such ends) would show a small one, which
    prompts of CHUNK_CONTRADICTS times it prefilled in a step or two then outvote.
    Measured in bench/fairness.py's engines: chunks of 512 and prompts of 4,000
    count 9 (and 8); chunks of 2,048, 3 (and 2); whole prompts 1-2. Pure."""

    # (tokens prefilled a step, the prompt's own tokens)
    seen: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=CHUNK_KEPT))

    def note(self, prompt_tokens: float, steps: float, own_tokens: float) -> float | None:
        """`prompt_tokens` were prefilled over the `steps` of a prompt of `own_tokens`:
        the chunk it is now taken to be (prompt tokens a step), or None (whole prompts
        in a step, as far as the streams show)."""
        if steps >= CHUNK_MIN_STEPS:
            self.seen.append((prompt_tokens / (steps - 1.0), own_tokens))
        else:
            chunk = self.chunk_if_any()
            if chunk is not None and own_tokens >= CHUNK_CONTRADICTS * chunk:
                # Well over the chunk in a step or two: the chunk is wrong (learnt from
                # prompts that waited unseen), or this count was one short; this one
                # says a prompt goes in whole.
                self.seen.append((own_tokens, own_tokens))
        return self.chunk_if_any()

    def chunk_if_any(self) -> float | None:
        """The chunk the prompts seen show, or None (too few, or no prompt split)."""
        if len(self.seen) < CHUNK_EVIDENCE:
            return None
        chunk = statistics.median(s for s, _ in self.seen)
        return chunk if chunk < statistics.median(p for _, p in self.seen) else None


@dataclass(slots=True, eq=False)
class Flight:
    """One request in flight, as attribution sees it. `handle` is the caller's (the
    ledger ticket, or whatever it reweighs through)."""

    prompt_tokens: float
    stream: bool = True
    embeddings: bool = False
    handle: Any = None
    phase: str = WAITING
    weight: float = 0.0
    eq: float = 0.0  # 1 while it shares the fixed cost of the steps (`model`, running)
    t0_s: float = 0.0  # when it was sent (the caller's clock; for inferring the capacity)
    seq: int = 0  # its place in the order of arrival at its backend
    # Its weight is prefill work priced by the cost model (`model` mode, prefilling): the
    # ledger's sensitivities tell it from decode work.
    prefill_work: bool = False
    prefill_from_s: float | None = None  # when its prefill began, as far as known
    # Prompt tokens it is taken to prefill in each step, where the engine's chunk is known
    # (`EngineQueue.chunk_tokens`): the prefill budget, shared oldest first.
    allotted: float = 0.0
    # The decoding streams' integrals and the prompt tokens prefilled when its prefill
    # began (`EngineQueue`): the steps its prefill took, and the tokens prefilled in them,
    # counted at its first token (`Attribution.first_token`).
    at_prefill: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    counted_from_s: float | None = None  # when that count began (`Attribution.reached`)


@dataclass(frozen=True, slots=True)
class WorkPrice:
    """The cost model per engine step, for `model` mode: what a running request's own work
    costs in one step, joules. A prefilling request's whole prompt is taken to go through
    in one step (`prefill_j_per_token` x its prompt tokens, or x its part of the chunk on
    a chunked engine: `Flight.allotted`); a decoding one makes one token
    a step (`decode_j_per_step`). The fixed cost of a step, shared by all running, is the
    ledger's `fixed_w` in the same unit. One unit for all: every request in a step is
    charged for the same steps, so the step rate cancels out of the split."""

    prefill_j_per_token: float = DEFAULT_PREFILL_J_PER_TOKEN
    decode_j_per_step: float = DEFAULT_DECODE_J_PER_TOKEN
    # A non-streamed answer shows no first token: its prefill is spread over the steps it
    # is expected to run (the tokens such answers generate on this backend, learnt).
    amortize_steps: float = DEFAULT_NONSTREAM_TOKENS
    # One engine step: requests that arrive within it of a prefill's start share its step.
    step_s: float = 1.0 / DEFAULT_DECODE_TOKENS_PER_S


@dataclass(slots=True)
class EngineQueue:
    """The proxy's model of one backend's admission queue."""

    configured: int | None = None  # max_running from the config, if given
    capacity: int | None = None  # None: no limit known
    # In arrival order, the oldest first; O(1) to take the oldest or newest, or drop any.
    running: OrderedDict[int, Flight] = field(default_factory=OrderedDict)
    waiting: OrderedDict[int, Flight] = field(default_factory=OrderedDict)
    price: WorkPrice = field(default_factory=WorkPrice)  # `model` mode's weights
    # Running requests whose prefill is seen and under way, and those waiting for the
    # step it is in to end (NEXT_STEP).
    prefilling: dict[int, Flight] = field(default_factory=dict)
    next_step: dict[int, Flight] = field(default_factory=dict)
    # Until the gauges show it: what the answers showed of the capacity (`Attribution.infer`).
    gauged: bool = False  # the backend's own counts showed the capacity (a queue): they decide
    last_end_s: float | None = None  # when a request last ended (freeing a place)
    evidence: int = 0  # first tokens that followed an end as an admission does
    inferred: int = 0  # the most requests seen running at such an admission
    arrivals: int = 0  # requests started, for each one's `seq`
    # Tokens streamed by its decoding streams after their first (the relay counts them)
    # and how many streams decode now.
    streamed: int = 0
    decode_streams: int = 0
    # Over time (the caller's clock): streams decoding x seconds, the seconds any stream
    # decoded, and when the count last changed. With `streamed`, the engine's steps in an
    # interval (the fit's, cost_model.py): tokens streamed over the streams decoding.
    decoder_s: float = 0.0
    decoded_s: float = 0.0
    decoders_since_s: float | None = None
    # Chunked prefill: the prompt tokens the engine prefills in one step, across the
    # requests prefilling (vLLM's max_num_batched_tokens), configured or learnt from the
    # steps streamed prompts took (`ChunkEvidence`); None: a prompt in one step.
    chunk_tokens: float | None = None
    chunk_configured: float | None = None
    chunk: ChunkEvidence = field(default_factory=lambda: ChunkEvidence())
    allotted_tokens: float = 0.0  # the prefilling requests' allotments, summed (if chunked)
    # An allotment was freed, or the chunk changed: the chunk is shared again at the next
    # `Attribution._reallot` (else that is a no-op: O(1) events).
    reshare: bool = False
    prefilled_tokens: float = 0.0  # prompt tokens of the seen prefills that ended, summed

    def count_decoders(self, delta: int, now_s: float | None) -> None:
        """A stream began (+1) or stopped (-1) decoding at `now_s` (None: not known)."""
        self.advance_decoders(now_s)
        self.decode_streams += delta

    def advance_decoders(self, now_s: float | None) -> None:
        """Bring the decoding integrals up to `now_s`."""
        if now_s is None:
            return
        since = self.decoders_since_s
        if since is not None and now_s > since and self.decode_streams > 0:
            self.decoder_s += self.decode_streams * (now_s - since)
            self.decoded_s += now_s - since
        if since is None or now_s > since:
            self.decoders_since_s = now_s

    def __post_init__(self) -> None:
        if self.configured is not None:
            self.capacity = self.configured
        if self.chunk_configured is not None:
            if not self.chunk_configured > 0.0:
                raise ValueError(f"prefill chunk must be > 0 tokens, not {self.chunk_configured}")
            self.chunk_tokens = self.chunk_configured

    def learn(self, running: float | None, waiting: float | None) -> bool:
        """The backend's own counts (its /metrics). With requests waiting, what runs is at
        the capacity; a count above the capacity known raises it. True when it changed."""
        if running is None or self.configured is not None:
            return False
        r = round(running)
        # Requests wait a moment for the next step even with room (a scrape can catch
        # that): the capacity is the most seen running while others waited, never less.
        with_queue = waiting is not None and waiting >= 1 and r >= 1
        # Gauges read while nothing waited say nothing of the limit: the answers' starts
        # go on inferring it until a read shows a queue (a burst right after start is
        # over before a read every few seconds sees one).
        self.gauged = self.gauged or with_queue
        if (with_queue or self.capacity is not None) and r > (self.capacity or 0):
            self.capacity = r
            return True
        return False

    def may_queue(self) -> bool:
        """Whether the requests in flight may be more than the backend runs at once: more
        than the capacity known, or two or more while none is known. Then its gauges are
        worth reading often (they show the queue, and the capacity with it)."""
        inflight = len(self.running) + len(self.waiting)
        if self.capacity is None:
            return inflight >= 2
        return inflight > self.capacity

    def capacity_source(self) -> str:
        """Where the capacity came from: `configured`, `learnt` from the backend's gauges,
        `inferred` from when its answers started, or `unknown` (no limit known)."""
        if self.configured is not None:
            return "configured"
        if self.capacity is None:
            return "unknown"
        return "learnt" if self.gauged else "inferred"

    def chunk_source(self) -> str:
        """Where the prefill chunk came from: `configured`, `learnt` from the streams, or
        `none` (a prompt is taken to prefill in one step)."""
        if self.chunk_configured is not None:
            return "configured"
        return "none" if self.chunk_tokens is None else "learnt"

    @property
    def decoding(self) -> int:
        """Running requests past their first token (for inspection; O(running))."""
        return sum(1 for f in self.running.values() if f.phase == DECODE)

    def full(self) -> bool:
        return self.capacity is not None and len(self.running) >= self.capacity


class Attribution:
    """Weights for one mode; the caller applies them to the ledger."""

    def __init__(self, mode: str = MODEL) -> None:
        if mode not in MODES:
            raise ValueError(f"attribution must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode

    def _run(self, f: Flight, queue: EngineQueue, phase: str, now_s: float | None = None) -> float:
        """`f` runs now (`now_s`, if known), in `phase`: its weight (and its equal part of
        the fixed cost)."""
        f.phase = phase
        f.prefill_from_s = now_s if phase == PREFILL else None
        if phase == DECODE and f.stream:
            queue.count_decoders(+1, now_s)
        f.eq = 1.0 if self.mode == MODEL else 0.0
        _leave_prefill(queue, f)
        f.prefill_work = self.mode == MODEL and phase == PREFILL and (f.stream or f.embeddings)
        if f.prefill_work:
            _count_from(f, queue, now_s)
            queue.prefilling[id(f)] = f
            budget = _budget(queue)
            f.allotted = f.prompt_tokens
            if budget is not None:  # the chunk's allotments are summed only where one is known
                f.allotted = min(_per_step(f, queue), max(0.0, budget - queue.allotted_tokens))
                f.eq = 1.0 if f.allotted > 0.0 else 0.0
                queue.allotted_tokens += f.allotted
        f.weight = self._running_weight(f, queue)
        return f.weight

    def _running_weight(self, f: Flight, queue: EngineQueue) -> float:
        prefilling = f.phase == PREFILL and (f.stream or f.embeddings)
        if self.mode == EQUAL:
            return 1.0
        if self.mode == TOKENS:
            return f.prompt_tokens if prefilling else DECODE_WEIGHT
        if self.mode == MODEL:
            price = queue.price
            if prefilling:
                return price.prefill_j_per_token * f.allotted
            if f.phase == PREFILL and not f.stream:  # its prefill unseen: spread over its steps
                steps = max(1.0, price.amortize_steps)
                return price.decode_j_per_step + price.prefill_j_per_token * f.prompt_tokens / steps
            return price.decode_j_per_step
        if prefilling:
            return 1.0 + f.prompt_tokens / PREFILL_TOKENS_PER_UNIT
        return DECODE_WEIGHT

    def reached(self, f: Flight, queue: EngineQueue, now_s: float) -> None:
        """The backend answered `f`'s request (its response began, at `now_s`): it has
        the request now. The steps its prefill takes are counted from here, where it is
        later than its admission (a burst's requests reach a backend tens of
        milliseconds after the proxy took them, while the running streams go on)."""
        began = f.counted_from_s
        if f.prefill_work and began is not None and now_s > began:
            _count_from(f, queue, now_s)

    def decoding_weight(self, queue: EngineQueue) -> tuple[float, float]:
        """The weight and equal share (`eq`) of one running, decoding request under this
        mode: what a request the proxy did not send is taken to weigh (untracked.py)."""
        f = Flight(0.0, phase=DECODE)
        return self._running_weight(f, queue), 1.0 if self.mode == MODEL else 0.0

    def observe(
        self, queue: EngineQueue, running: float | None, waiting: float | None
    ) -> list[tuple[Flight, float]]:
        """The backend's own counts: when they reveal a smaller capacity than the model
        ran with, the newest requests still in prefill go back to waiting (what FIFO
        admission would have done); the requests whose weight changes now."""
        if not queue.learn(running, waiting) or self.mode not in QUEUED_MODES:
            return []
        changed = self._requeue(queue)
        changed += self._admit(queue)
        return changed + self._reallot(queue)

    def start(self, f: Flight, queue: EngineQueue, now_s: float | None = None) -> float:
        """A request arrives (at `now_s`, the caller's clock, if given): its first weight
        (0 while the queue model holds it, or while it waits for the engine's step to end:
        NEXT_STEP)."""
        queue.arrivals += 1
        f.seq = queue.arrivals
        if self.mode in QUEUED_MODES and (queue.full() or queue.waiting):
            f.phase = WAITING
            queue.waiting[id(f)] = f
            f.weight, f.eq = 0.0, 0.0
            return 0.0
        queue.running[id(f)] = f
        if (
            self.mode == MODEL
            and now_s is not None
            and queue.chunk_tokens is None  # a chunked engine's steps are short: it joins
            and _step_under_way(queue, now_s)
        ):
            # A prefill's step is under way: the engine's step in progress is not its own.
            f.phase, f.weight, f.eq = NEXT_STEP, 0.0, 0.0
            queue.next_step[id(f)] = f
            return 0.0
        return self._run(f, queue, PREFILL, now_s)

    def step_ended(self, queue: EngineQueue, now_s: float) -> list[tuple[Flight, float]]:
        """A step ended at `now_s` (a first token came, or an embeddings answer): the
        requests that were waiting for it join the next one, in prefill. Returns their
        new weights."""
        joined = list(queue.next_step.values())
        queue.next_step.clear()
        changed = [(f, self._run(f, queue, PREFILL, now_s)) for f in joined]
        return changed + self._reallot(queue)

    def _reallot(self, queue: EngineQueue) -> list[tuple[Flight, float]]:
        """Share the engine's chunk again among the requests prefilling, oldest first
        (a prefill ended, or the chunk is known now): those whose weight changes.
        O(1) unless an allotment was freed or the chunk changed (`EngineQueue.reshare`);
        then O(the prefilling requests that hold or get an allotment), or once
        O(prefilling) when a chunk is no longer known (each prompt whole again)."""
        if self.mode != MODEL or not queue.reshare:
            return []
        queue.reshare = False
        budget = _budget(queue)
        changed: list[tuple[Flight, float]] = []
        left, total = budget, 0.0
        for f in queue.prefilling.values():
            if left is not None and left <= 0.0 and f.allotted == 0.0:
                break  # the allotments fill the oldest first: the rest hold none either
            take = f.prompt_tokens if left is None else min(_per_step(f, queue), max(0.0, left))
            if left is not None:
                left -= take
                total += take
            if take != f.allotted:
                f.allotted = take
                f.eq = 1.0 if take > 0.0 or budget is None else 0.0
                f.weight = self._running_weight(f, queue)
                changed.append((f, f.weight))
        queue.allotted_tokens = total
        return changed

    def first_token(
        self, f: Flight, queue: EngineQueue, now_s: float | None = None
    ) -> float | None:
        """Its first streamed token (at `now_s`, the caller's clock, if given): its new
        weight, or None if it does not change."""
        if f.phase == DECODE:
            return None
        queue.next_step.pop(id(f), None)
        if f.phase == WAITING:
            # It runs: the model's capacity was too small.
            queue.waiting.pop(id(f), None)
            queue.running[id(f)] = f
            if queue.capacity is not None and queue.configured is None:
                queue.capacity = max(queue.capacity, len(queue.running))
        if f.prefill_work:
            if f.stream and now_s is not None:
                _count_steps(f, queue, now_s)
            queue.prefilled_tokens += f.prompt_tokens
        was = (f.weight, f.eq)
        new = self._run(f, queue, DECODE, now_s)
        if (new, f.eq) == was:
            return None
        return new

    def make_room(self, f: Flight, queue: EngineQueue) -> Flight | None:
        """`f` shows its first token while the model holds it waiting, at the capacity:
        it ran in the place of the newest admitted request that has shown no token (two
        arrivals that raced reach the engine in the other order). That one goes back to
        the front of the waiting line, weightless, and is returned: what it was charged
        so far was `f`'s, and the caller swaps the two in the ledger (Ledger.exchange)
        before `first_token`. None when there is none to displace (every running request
        decodes): the capacity was larger, and `first_token` raises it."""
        if self.mode not in QUEUED_MODES or f.phase != WAITING or not queue.full():
            return None
        g = _newest_unstarted(queue)
        if g is not None:
            _send_back(queue, g)
        return g

    def ran_instead(self, f: Flight, queue: EngineQueue) -> Flight | None:
        """`f` ends with an answer while the model still holds it waiting: the backend
        ran it in place of a request the model admitted instead (a backend that does not
        serve in arrival order, e.g. llama-cpp-python's lock). That one is the newest
        admitted request that has shown no first token; its share so far was `f`'s, and
        the caller swaps the two in the ledger (Ledger.exchange). None when there is no
        such request: every running one has shown a token, so `f` ran beside them (the
        capacity was larger), and the time it ran is not known.

        Call before finish(). Non-streaming requests never show a first token, so without
        this a request served out of order would be told 0 J and another twice its due."""
        if self.mode not in QUEUED_MODES or f.phase != WAITING:
            return None
        return _newest_unstarted(queue)

    def finish(
        self, f: Flight, queue: EngineQueue, now_s: float | None = None
    ) -> list[tuple[Flight, float]]:
        """It ends (at `now_s`, the caller's clock): the requests whose weight changes now
        (admitted in its place)."""
        if now_s is not None:
            queue.last_end_s = now_s
        if f.phase == WAITING:
            queue.waiting.pop(id(f), None)
            return []
        queue.running.pop(id(f), None)
        if f.phase == DECODE and f.stream:
            queue.count_decoders(-1, now_s)
        if f.prefill_work and f.embeddings:  # its answer ends its prefill
            queue.prefilled_tokens += f.prompt_tokens
        _leave_step(queue, f)
        return self._admit(queue, now_s) + self._reallot(queue)

    def infer(self, f: Flight, queue: EngineQueue, now_s: float) -> list[tuple[Flight, float]]:
        """`f`'s first token, at `now_s`, on a backend whose gauges are not read and whose
        capacity is not configured: what it shows of the capacity. A request that waited
        long and started just after another ended was admitted in its place (FIFO under a
        limit): the requests in flight that arrived before it, itself included, all run
        then (arrival order), those that show no token too (non-streaming, embeddings),
        and are the capacity, or fewer. From the INFER_EVIDENCE-th such start the queue
        model runs at the most seen; the newest requests still in prefill beyond it go
        back to waiting. Returns the requests whose weight changes (call before
        `first_token`). O(1) for a start that follows no end; O(in flight) for one that
        does."""
        if self.mode not in QUEUED_MODES or queue.configured is not None or queue.gauged:
            return []
        end_s = queue.last_end_s
        if f.phase == DECODE or end_s is None or end_s <= f.t0_s:
            return []
        if now_s - end_s > FOLLOW_FRACTION * (now_s - f.t0_s):
            return []  # it started on its own, not in a place an end freed
        queue.evidence += 1
        queue.inferred = max(queue.inferred, _arrived_before(queue, f.seq))
        if queue.evidence < INFER_EVIDENCE:
            return []
        if queue.capacity is not None and queue.capacity >= queue.inferred:
            return []
        queue.capacity = queue.inferred
        return self._requeue(queue, keep=f) + self._reallot(queue)

    def _requeue(
        self, queue: EngineQueue, keep: Flight | None = None
    ) -> list[tuple[Flight, float]]:
        """More running than the capacity: the newest still in prefill (not `keep`) go
        back to waiting, ahead of later arrivals (what FIFO admission would have done)."""
        changed: list[tuple[Flight, float]] = []
        for key in reversed(list(queue.running)):
            if not queue.capacity or len(queue.running) <= queue.capacity:
                break
            g = queue.running[key]
            if g.phase not in (PREFILL, NEXT_STEP) or g is keep:
                continue  # a decoding request is running for certain
            _send_back(queue, g)
            changed.append((g, 0.0))
        return changed

    def _admit(self, queue: EngineQueue, now_s: float | None = None) -> list[tuple[Flight, float]]:
        """Admit the oldest waiting requests while there is room (at `now_s`, if known)."""
        admitted: list[tuple[Flight, float]] = []
        while queue.waiting and not queue.full():
            key, nxt = queue.waiting.popitem(last=False)
            queue.running[key] = nxt
            admitted.append((nxt, self._run(nxt, queue, PREFILL, now_s)))
        return admitted


def _step_under_way(queue: EngineQueue, now_s: float) -> bool:
    """Whether a seen prefill began more than a step before `now_s`: its step is running,
    and a request arriving now is not in it. The oldest prefilling request began first
    (they are kept in the order their prefill began)."""
    oldest = next(iter(queue.prefilling.values()), None)
    if oldest is None:
        return False
    began = oldest.prefill_from_s
    return began is not None and began < now_s - queue.price.step_s


def _leave_step(queue: EngineQueue, f: Flight) -> None:
    """`f` no longer prefills, nor waits for a step to end."""
    _leave_prefill(queue, f)
    queue.next_step.pop(id(f), None)


def _leave_prefill(queue: EngineQueue, f: Flight) -> None:
    """`f` no longer prefills: its allotment of the chunk is free (shared again by
    `Attribution._reallot`)."""
    if queue.prefilling.pop(id(f), None) is not None and queue.chunk_tokens is not None:
        queue.allotted_tokens = max(0.0, queue.allotted_tokens - f.allotted)
        queue.reshare = queue.reshare or f.allotted > 0.0
    f.allotted = 0.0


def _budget(queue: EngineQueue) -> float | None:
    """The prompt tokens the engine prefills a step now: a learnt chunk is what prompts
    were seen to prefill; a configured one (vLLM's --max-num-batched-tokens) also holds
    the token of each decoding sequence (the running requests not prefilling)."""
    chunk = queue.chunk_tokens
    if chunk is None or queue.chunk_configured is None:
        return chunk
    return max(0.0, chunk - (len(queue.running) - len(queue.prefilling)))


def _per_step(f: Flight, queue: EngineQueue) -> float:
    """The prompt tokens `f` prefills a step on a chunked engine, on average over its
    prefill: a configured chunk C (the engine's budget) takes P / ceil(P / C) (its last
    chunk is the rest); a learnt one is already what prompts prefilled a step."""
    prompt, chunk = f.prompt_tokens, queue.chunk_tokens
    if chunk is None or prompt <= 0.0:
        return prompt
    if queue.chunk_configured is None:
        return min(prompt, chunk)
    return prompt / math.ceil(prompt / chunk)


def _count_from(f: Flight, queue: EngineQueue, now_s: float | None) -> None:
    """Count the steps of `f`'s prefill from `now_s`: what has streamed and been
    prefilled so far."""
    queue.advance_decoders(now_s)
    f.counted_from_s = now_s
    f.at_prefill = (float(queue.streamed), queue.decoder_s, queue.decoded_s, queue.prefilled_tokens)


def _count_steps(f: Flight, queue: EngineQueue, now_s: float) -> None:
    """`f`'s first token, at `now_s`, after a seen prefill: the steps it took, counted by
    the tokens the decoding streams streamed since it began, where they decoded through
    nearly all of it, go to the evidence of the engine's chunk (unless configured). While
    the queue's capacity is unknown the model takes every request to run, and one the
    engine held waiting counts the steps it waited: the small chunk that may show is
    contradicted later (`ChunkEvidence.note`), and until then prices the prompts the
    model takes to prefill side by side, most of which wait in truth, nearer their due."""
    began = f.counted_from_s
    if began is None or f.prompt_tokens < CHUNK_MIN_PROMPT or queue.chunk_configured:
        return
    queue.advance_decoders(now_s)
    streamed0, decoder0_s, decoded0_s, prefilled0 = f.at_prefill
    window_s, decoded_s = now_s - began, queue.decoded_s - decoded0_s
    if window_s <= 0.0 or decoded_s < CHUNK_COVERED * window_s:
        return
    decoders = (queue.decoder_s - decoder0_s) / decoded_s
    steps = (queue.streamed - streamed0) / decoders
    tokens = f.prompt_tokens + queue.prefilled_tokens - prefilled0
    chunk = queue.chunk.note(tokens, steps, f.prompt_tokens)
    if chunk != queue.chunk_tokens:
        queue.chunk_tokens, queue.reshare = chunk, True


def _arrived_before(queue: EngineQueue, seq: int) -> int:
    """The requests in flight that arrived no later than the `seq`-th. Admitted in
    arrival order, they all run when that one is admitted: those that show no token too
    (non-streaming requests, embeddings), which a count of the decoding would miss."""
    return sum(1 for f in queue.running.values() if f.seq <= seq) + sum(
        1 for f in queue.waiting.values() if f.seq <= seq
    )


def _newest_unstarted(queue: EngineQueue) -> Flight | None:
    """The newest running request that has shown no first token (None: all decode)."""
    for key in reversed(queue.running):
        f = queue.running[key]
        if f.phase in (PREFILL, NEXT_STEP):
            return f
    return None


def _send_back(queue: EngineQueue, f: Flight) -> None:
    """A running request goes back to waiting, weightless, ahead of every later arrival
    (the front of the line: it was admitted before them)."""
    key = id(f)
    del queue.running[key]
    _leave_step(queue, f)
    queue.waiting[key] = f
    queue.waiting.move_to_end(key, last=False)
    f.phase, f.weight, f.eq, f.prefill_work = WAITING, 0.0, 0.0, False
