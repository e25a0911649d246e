"""The proxy's model of one backend's engine, as attribution.py keeps it: the requests in
flight (`Flight`), its admission queue and prefill chunk (`EngineQueue`), and the price
of a step's work (`WorkPrice`). Data and its bookkeeping; the weights are attribution.py's.
Pure: no I/O, no clock."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from metering.accounting.chunk import ChunkEvidence
from metering.accounting.cost_model import (
    DEFAULT_DECODE_J_PER_TOKEN,
    DEFAULT_DECODE_TOKENS_PER_S,
    DEFAULT_NONSTREAM_TOKENS,
    DEFAULT_PREFILL_J_PER_TOKEN,
)

WAITING, PREFILL, DECODE = "waiting", "prefill", "decode"
# Admitted, but the engine is in a step it cannot join: another request's prefill, seen
# (streamed, or embeddings), is under way. It joins at the step's end, which the next
# first token (or an embeddings answer) shows: `model` mode.
NEXT_STEP = "next step"


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
