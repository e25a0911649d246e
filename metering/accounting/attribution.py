"""How much of each energy interval a request in flight is charged: its weight, over time.

The ledger (ledger.py) splits the energy of every interval among the requests in flight
in proportion to their weights; this module decides the weights. Pure: no I/O, no clock.
Four modes (`--attribution`):

`model` (the default). As `queue` below for who runs and who waits, with the weights of
the running requests from the backend's cost model fitted on this host (cost_model.py):
each running request shares the fixed cost of each step equally with the others running
(the ledger's `eq` part) and pays its own work in the step, `c_prefill * prompt tokens`
(on an engine that prefills in chunks, the part of the chunk it holds: `_take`)
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

from metering.accounting.chunk import (
    CHUNK_MIN_PROMPT,
    budget_tokens,
    per_step_tokens,
    prefill_overdue,
    steps_in_window,
)
from metering.accounting.queue_model import (
    DECODE,
    NEXT_STEP,
    PREFILL,
    WAITING,
    EngineQueue,
    Flight,
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


# Capacity from the answers alone (no gauges): a first token that comes within this
# fraction of the request's time in flight after another request ended was an admission
# into the place that end freed; INFER_EVIDENCE of them make the queue model limit.
FOLLOW_FRACTION = 0.25
INFER_EVIDENCE = 2


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
            left = None if budget is None else budget - queue.allotted_tokens
            f.allotted = _take(f, queue, left)
            if left is not None:  # the chunk's allotments are summed only where one is known
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
        changed += self._reallot(queue)  # before admitting: the oldest prompts first
        return changed + self._admit(queue)

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
        changed = self._reallot(queue)  # the prompts prefilling first, then those joining
        joined = list(queue.next_step.values())
        queue.next_step.clear()
        return changed + [(f, self._run(f, queue, PREFILL, now_s)) for f in joined]

    def _reallot(self, queue: EngineQueue) -> list[tuple[Flight, float]]:
        """Share the engine's chunk again among the requests prefilling, oldest first
        (a prefill ended, or the chunk is known now): those whose weight changes.
        O(1) unless an allotment was freed or the chunk changed (`EngineQueue.reshare`);
        then O(prefilling): on a chunked engine, once per prefill that ends."""
        if self.mode != MODEL or not queue.reshare:
            return []
        queue.reshare = False
        budget = _budget(queue)
        changed: list[tuple[Flight, float]] = []
        left, total = budget, 0.0
        for f in queue.prefilling.values():
            take = _take(f, queue, left)
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
            # It runs: the model's capacity was too small. (Its prompt is not added to the
            # tokens later prompts count: in a burst's races that put the overdue check
            # steps late, 0.056-0.060 off in two of nine runs through HTTP against none.)
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
        return self._reallot(queue) + self._admit(queue, now_s)

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

    def stalled(self, queue: EngineQueue, now_s: float) -> list[tuple[Flight, float]]:
        """At `now_s`, on a backend whose gauges are not read (or have shown no queue yet)
        and whose capacity is not configured: whether the oldest streamed prompt the model
        takes to prefill has gone far longer than its prefill could take without a first
        token (chunk.prefill_overdue: the steps the decoding streams streamed since the
        backend had it, against the tokens prefilled meanwhile and its own). Then it
        waits in truth, and under FIFO admission the requests ahead of it are the
        capacity: a burst right after start shows its limit before any request ends. The
        requests past the capacity go back to waiting; returns those whose weight
        changes. Its steps are checked in O(1); O(running) when it is overdue. A capacity
        too small is raised by the first tokens of requests it holds waiting."""
        if self.mode != MODEL or queue.configured is not None or queue.gauged:
            return []
        if queue.decode_streams == 0:  # no stream counts the steps
            return []
        # (A request admitted at a gauge read has no count begun: the next one is taken.)
        f = next((g for g in queue.prefilling.values() if g.stream and g.counted_from_s), None)
        if f is None or f.counted_from_s is None:
            return []
        queue.advance_decoders(now_s)
        streamed0, decoder0_s, decoded0_s, prefilled0 = f.at_prefill
        steps = steps_in_window(
            now_s - f.counted_from_s,
            queue.streamed - streamed0,
            queue.decoder_s - decoder0_s,
            queue.decoded_s - decoded0_s,
        )
        ahead = queue.prefilled_tokens - prefilled0
        # A configured chunk also holds a token of each decoding sequence (budget_tokens).
        chunk = _budget(queue) if queue.chunk_tokens is not None else None
        if steps is None or not prefill_overdue(steps, ahead, f.prompt_tokens, chunk):
            return []
        before = 0
        for g in queue.running.values():
            if g.seq >= f.seq:
                continue
            before += 1
            if g.phase in (PREFILL, NEXT_STEP) and (not g.stream or g.embeddings):
                return []  # a prefill ahead that no first token shows: its steps unknown
        # Never fewer than those decoding: a newer request decoding raced it to the engine
        # (a burst's arrivals reach it in another order), or it waits on something of its
        # own (a grammar compiling) and costs nothing meanwhile either way.
        capacity = max(before, queue.decoding, 1)
        if queue.capacity is not None and queue.capacity <= capacity:
            return []
        queue.capacity = capacity
        return self._requeue(queue) + self._reallot(queue)

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
    """The prompt tokens the engine prefills a step now (chunk.budget_tokens)."""
    decoding = len(queue.running) - len(queue.prefilling)
    return budget_tokens(queue.chunk_tokens, queue.chunk_configured is not None, decoding)


def _take(f: Flight, queue: EngineQueue, left: float | None) -> float:
    """The prompt tokens `f` is allotted a step when `left` of the budget remains after
    the prompts before it (None: no chunk, its whole prompt; chunk.per_step_tokens)."""
    if left is None:
        return f.prompt_tokens
    configured = queue.chunk_configured is not None
    return min(per_step_tokens(f.prompt_tokens, queue.chunk_tokens, configured), max(0.0, left))


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
    steps = steps_in_window(
        now_s - began,
        queue.streamed - streamed0,
        queue.decoder_s - decoder0_s,
        queue.decoded_s - decoded0_s,
    )
    if steps is None:
        return
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
