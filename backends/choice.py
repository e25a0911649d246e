"""Which of the backends serving a model takes a request: the routing policies. Pure.

Every policy chooses among the backends the guard allows:
- never one that is down (unless all are: the first then answers for itself);
- while another has room, never one where this request would wait beyond the bound
  (`max_waiting`, default 0: none may wait). A backend's queue is its own waiting count
  where its gauges tell one, or the requests the proxy has in flight there beyond the
  capacity known for it (none known: no queue is assumed); it has room when nothing waits
  and it runs fewer than its capacity. When none has room, the least loaded takes it.

Then:
- `first`: the first configured backend the guard allows (today's behaviour);
- `least-loaded`: the fewest requests in flight, the backend's own count where it has
  gauges; ties to the first configured;
- `energy`: the lowest marginal energy per token for a request of this shape
  (metering/accounting/marginal.py); backends whose estimates are within each other's
  standard error are treated as equal, and the least loaded of them takes it, so they
  share the traffic;
- `carbon`: the same on gCO2eq per token (that energy times the backend's grid intensity).
`energy` and `carbon` send a share (`explore`, default 5 %) of requests to another allowed
backend chosen at random, so that each keeps a fresh figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

FIRST, LEAST_LOADED, ENERGY, CARBON = "first", "least-loaded", "energy", "carbon"
POLICIES = (FIRST, LEAST_LOADED, ENERGY, CARBON)
MEASURED = frozenset({ENERGY, CARBON})  # policies that need each backend's energy apart
DEFAULT_EXPLORE = 0.05
DEFAULT_MAX_WAITING = 0

# Why a backend was chosen (the `x-energy-route` header's `reason`, the metrics' label).
ONLY = "only"  # one backend serves the model
ORDER = "first"  # the first the guard allows
FEWEST = "least-loaded"
LOWEST = "lowest"  # the lowest estimate, clear of the others' errors
TIE = "tie"  # within the errors of the lowest: the least loaded of those
EXPLORE = "explore"
CROWDED = "all-queued"  # every allowed backend is past its bound: the least loaded
DOWN = "all-down"  # none is ready: the first answers for itself
REASONS = (ONLY, ORDER, FEWEST, LOWEST, TIE, EXPLORE, CROWDED, DOWN)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One backend as the policy sees it. `per_token` and `per_token_se`: the estimate the
    policy ranks by (J or gCO2eq per token) and its standard error (None: no estimate)."""

    name: str
    ready: bool = True
    inflight: float = 0.0  # the proxy's requests in flight there
    own_inflight: float | None = None  # its own count of requests running and waiting
    waiting: float | None = None  # its own count waiting (gauges), when told
    capacity: int | None = None  # the most it runs at once, when known or learnt
    capacity_configured: bool = False  # ... as its configuration says (not learnt)
    per_token: float | None = None
    per_token_se: float | None = None

    @property
    def load(self) -> float:
        """Requests in flight there: its own count where told (others' work counts too)."""
        return max(self.inflight, self.own_inflight or 0.0)

    @property
    def limit(self) -> int | None:
        """The capacity the guard counts the proxy's requests against: a configured one;
        a learnt one only where no gauges tell the queue (one learnt from the gauges is
        the most seen so far, often below what the backend runs; the gauges say better)."""
        if self.capacity_configured or self.waiting is None:
            return self.capacity
        return None

    def queued(self) -> float:
        """Requests waiting there: its gauges' count, or the proxy's beyond its `limit`
        (the gauges are read now and then; the proxy's own count is always current)."""
        limit = self.limit
        mine = 0.0 if limit is None else max(0.0, self.inflight - limit)
        return max(mine, self.waiting or 0.0)

    def has_room(self) -> bool:
        """Nothing waits there and one more would not wait."""
        if self.queued() > 0.0:
            return False
        limit = self.limit
        return limit is None or self.load < limit


@dataclass(frozen=True, slots=True)
class Choice:
    index: int  # into the candidates
    reason: str


def allowed(candidates: Sequence[Candidate], max_waiting: int) -> list[int]:
    """The candidates the guard lets a policy choose from (indices, in order): ready, and,
    while another has room, with room, or with this request's wait within the bound.
    Empty when none is ready."""
    up = [i for i, c in enumerate(candidates) if c.ready]
    if not any(candidates[i].has_room() for i in up):
        return up  # all are queued: the least loaded takes it (CROWDED)
    return [
        i for i in up if candidates[i].has_room() or candidates[i].queued() + 1.0 <= max_waiting
    ]


def least_loaded(candidates: Sequence[Candidate], among: Sequence[int]) -> int:
    """The index among `among` with the fewest in flight (the first configured on a tie)."""
    return min(among, key=lambda i: (candidates[i].load, i))


def cheapest(candidates: Sequence[Candidate], among: Sequence[int]) -> tuple[list[int], bool]:
    """The candidates tied for the lowest estimate: those whose estimate, less its error,
    is not above the lowest's plus its error; and whether the lowest stands alone. A
    candidate without an estimate ties with all (it is unknown, not dear)."""
    figures = {i: _figure(candidates[i]) for i in among}
    known = [i for i in among if figures[i] is not None]
    if not known:
        return list(among), False
    best = min(known, key=lambda i: (figures[i] or (0.0, 0.0), i))
    value, err = figures[best] or (0.0, 0.0)
    top = value + err
    ties = [i for i in among if (f := figures[i]) is None or f[0] - f[1] <= top]
    return ties, len(ties) == 1


def _figure(c: Candidate) -> tuple[float, float] | None:
    """Its estimate and error; None when it has none, or one that is not a number."""
    if c.per_token is None or not math.isfinite(c.per_token):
        return None
    err = c.per_token_se if c.per_token_se is not None and math.isfinite(c.per_token_se) else 0.0
    return c.per_token, abs(err)


def choose(
    policy: str,
    candidates: Sequence[Candidate],
    *,
    explore: float = DEFAULT_EXPLORE,
    max_waiting: int = DEFAULT_MAX_WAITING,
    draw: float = 1.0,
) -> Choice:
    """The backend for one request. `draw`: a uniform number in [0, 1) (the caller's
    random source), which decides exploration and whom it explores."""
    if policy not in POLICIES:
        raise ValueError(f"routing policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if len(candidates) == 1:
        return Choice(0, ONLY)
    among = allowed(candidates, max_waiting)
    if not among:
        return Choice(0, DOWN)
    if not any(candidates[i].has_room() for i in among):
        return Choice(least_loaded(candidates, among), CROWDED)
    if policy == FIRST:
        return Choice(among[0], ORDER)
    if policy == LEAST_LOADED:
        return Choice(least_loaded(candidates, among), FEWEST)
    ties, alone = cheapest(candidates, among)
    best = Choice(ties[0], LOWEST) if alone else Choice(least_loaded(candidates, ties), TIE)
    others = [i for i in among if i != best.index]
    if explore > 0.0 and draw < explore and others:
        # The draw, rescaled to [0, 1), picks uniformly among the others allowed.
        pick = min(len(others) - 1, math.floor(draw / explore * len(others)))
        return Choice(others[pick], EXPLORE)
    return best
