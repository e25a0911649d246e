"""What a backend's work costs, fitted online on this host. Pure: no I/O, no clock.

A continuous-batching engine spends, in any interval of time (energy above idle):

    E = F * steps / 290 + c_prefill * prompt tokens prefilled + c_decode * tokens generated

`F` (watts at 290 steps a second, an H100's decode step of 3.4 ms: per step, F / 290 joules)
is the cost of running steps at all, whatever the batch: the weights read once per step,
kernel launches, the fixed part of a step. The steps of an interval are not seen; they
are its busy seconds times the step rate its decoding requests showed (each makes one
token a step; `Interval.features`), so a step that grows with its batch is not taken for
cheaper fixed cost and free decoding. It is shared equally by the requests
running (each step's fixed cost is a public good of the requests in it: the Shapley split).
`c_prefill` and `c_decode` (joules a token) are each request's own.

`CostFit` learns the three from what the proxy sees: the energy the sampler measured in
each interval (above the idle draw) and the work done in it, known when each request ends
(its prompt tokens spread over its prefill window, its generated tokens over its decode
window). An interval is used once every request that overlapped it has ended. The fit is
a Huber-weighted least squares over the recent intervals, pulled towards the defaults by
pseudo-observations (a ridge), coefficients kept >= 0; a few dozen intervals move it off
the defaults. Its residuals give the relative uncertainty of the split (`band_rel`).

The weights attribution.py gives running requests are this model per engine step: each
running request holds an equal share of the step's fixed cost (`F` over the step rate, the
ledger's equal part) plus its own work in the step, `c_prefill * prompt tokens` while it
prefills and `c_decode` while it decodes. The step rate (streams' decode rate) and the
prefill windows are learnt too (`Rates`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

# An H100 serving an 8B model: a decode step of 3.4 ms and 0.95 J above idle (280 W of
# fixed cost while it steps), 5 mJ per prompt token prefilled, 5 mJ per token decoded
# (figures of the engine model in tests/support/fakes/batching_engine.py, after ML.ENERGY's
# per-token measurements). Used until the fit has data; only their ratios matter to a split.
DEFAULT_FIXED_W = 280.0
DEFAULT_PREFILL_J_PER_TOKEN = 0.005
DEFAULT_DECODE_J_PER_TOKEN = 0.005
DEFAULT_DECODE_TOKENS_PER_S = 290.0  # per running sequence: one token per 3.4 ms step
DEFAULT_PREFILL_WINDOW_S = 0.05
# Tokens a non-streamed answer is taken to generate until its backend's are learnt (the
# steps its unseen prefill is spread over: attribution.py, `WorkPrice.amortize_steps`).
DEFAULT_NONSTREAM_TOKENS = 128.0

FIT_INTERVALS = 480  # recent intervals the fit looks at (four minutes of 2 Hz ticks)
MIN_INTERVALS_TO_FIT = 8
# The fit replaces the defaults in the split only once it explains the measured intervals
# well (its relative residual under this) over enough of them; until then it is reported
# (readyz, metrics, the band) but the defaults split.
TRUST_BAND_REL = 0.15
TRUST_INTERVALS = 60
# ...or once it explains them clearly better than the defaults do (its residual at most
# this fraction of theirs, on the same intervals): a host whose costs are far from the
# defaults' ratios, or a sensor too coarse for any model to explain each interval well,
# still splits by what was learnt there rather than by figures from another machine.
TRUST_GAIN = 0.8
# ...or, from its first fit, once the intervals rule the defaults out: the defaults
# explain them badly (their residual over TRUST_BAND_REL) and 2.5 times as badly as
# the fit, its residual counted for the coefficients it fitted (x sqrt(n / (n - 3)): over
# eight intervals a fit of three explains noise too). A host whose fixed cost is four
# times the defaults' shows it in the first seconds (the defaults then explain under half
# of each interval), and splitting by them meanwhile prices a prompt up to sixteen times
# its work; a fit that merely explains them a little better waits for TRUST_INTERVALS.
TRUST_EARLY_GAIN = 0.4
PRIOR_WEIGHT = 2.0  # pseudo-observations per coefficient: a ridge for what the data cannot tell
# Once the data identify a coefficient, the ridge only keeps the solve well posed: with
# PRIOR_WEIGHT it pulled a fixed cost four times the default's back towards it, and the
# decode cost, whose prior weighs little (a small part of an interval's energy), moved
# along with steps to make up for it (17 times the host's, "identified").
IDENTIFIED_PRIOR_WEIGHT = 1e-3
# A coefficient is identified when the intervals alone pin it down: its standard error,
# from the data without the prior (collinearity included), at most this fraction of its
# size (the larger of the fit and the default). Steady batches make the fixed cost and
# decode move together (busy seconds and decoded tokens in proportion): neither is then
# identified, and each is held at its default rather than shown as this host's.
IDENTIFIED_REL_SE = 0.25
REJECTS_DEFAULT_SE = 2.0  # ... unless the data put the default this many errors away
TERMS = ("fixed_w", "prefill_j_per_token", "decode_j_per_token")
HUBER_K = 1.5  # residuals beyond 1.5 robust standard deviations are down-weighted
IRLS_ROUNDS = 6
RATE_EWMA = 0.1


@dataclass(frozen=True, slots=True)
class Coefficients:
    fixed_w: float = DEFAULT_FIXED_W
    prefill_j_per_token: float = DEFAULT_PREFILL_J_PER_TOKEN
    decode_j_per_token: float = DEFAULT_DECODE_J_PER_TOKEN

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.fixed_w, self.prefill_j_per_token, self.decode_j_per_token)


@dataclass(slots=True)
class Interval:
    t0_s: float
    t1_s: float
    dynamic_j: float = 0.0
    busy_s: float = 0.0
    prompt_tokens: float = 0.0
    decode_tokens: float = 0.0
    # The seconds requests spent decoding in it, summed over the requests: with its decoded
    # tokens, the engine's step rate (each decoding request makes one token a step).
    decode_seq_s: float = 0.0
    # No work the proxy did not send ran in it (untracked.py): its energy is all the work
    # the fit knows of. An interval with untracked work is kept (work spreads over it) but
    # not fitted.
    clean: bool = True
    # Its engine steps as its streams showed them (each decoding stream streams a token a
    # step: `steps_seen`), when streams decoded through nearly all of its busy time.
    steps_seen: float | None = None

    def features(self) -> tuple[float, float, float]:
        """(its engine steps, in seconds at the default step rate; prompt tokens; decoded
        tokens). Steps are its busy seconds times the step rate its decoding requests
        showed (tokens over decode seconds); a step takes longer as the batch grows, and a
        cost per busy second would then take part of the decode cost for its own."""
        steps_s = self.busy_s
        if self.steps_seen is not None:
            steps_s = self.steps_seen / DEFAULT_DECODE_TOKENS_PER_S
        elif self.decode_seq_s > 0.0 and self.decode_tokens > 0.0:
            rate = self.decode_tokens / self.decode_seq_s
            steps_s = self.busy_s * rate / DEFAULT_DECODE_TOKENS_PER_S
        return (steps_s, self.prompt_tokens, self.decode_tokens)


@dataclass(slots=True)
class Rates:
    """Learnt per backend: how long a prefill window lasts and how fast a running sequence
    decodes (EWMAs of what finished requests showed)."""

    prefill_window_s: float = DEFAULT_PREFILL_WINDOW_S
    decode_tokens_per_s: float = DEFAULT_DECODE_TOKENS_PER_S
    nonstream_tokens: float = DEFAULT_NONSTREAM_TOKENS  # what non-streamed answers generate
    seen: int = 0
    nonstream_seen: int = 0

    def observe_nonstream(self, tokens: int) -> None:
        """A non-streamed answer generated `tokens` (no first token is seen of it)."""
        if tokens <= 0:
            return
        a = RATE_EWMA if self.nonstream_seen >= 10 else 1.0 / (self.nonstream_seen + 1)
        self.nonstream_tokens += a * (tokens - self.nonstream_tokens)
        self.nonstream_seen += 1

    def observe(self, prefill_s: float | None, decode_s: float | None, tokens: int) -> None:
        a = RATE_EWMA if self.seen >= 10 else 1.0 / (self.seen + 1)
        if prefill_s is not None and prefill_s > 0.0:
            self.prefill_window_s += a * (prefill_s - self.prefill_window_s)
        if decode_s is not None and decode_s > 0.0 and tokens > 1:
            rate = (tokens - 1) / decode_s
            self.decode_tokens_per_s += a * (rate - self.decode_tokens_per_s)
        self.seen += 1


@dataclass(slots=True)
class CostFit:
    """The fit of one backend's cost model over its recent intervals."""

    prior: Coefficients = field(default_factory=Coefficients)
    coefficients: Coefficients = field(default_factory=Coefficients)
    band_rel: float = 0.5  # relative uncertainty of a split, before any fit: wide
    defaults_band_rel: float | None = None  # the defaults' residual on the same intervals
    fitted_at_s: float | None = None
    intervals_used: int = 0
    # Each coefficient's standard error (None: not estimable) and whether the data
    # identified it (else it is held at the default): `identify`.
    std_errors: tuple[float | None, float | None, float | None] = (None, None, None)
    identified: tuple[bool, bool, bool] = (False, False, False)
    _intervals: deque[Interval] = field(default_factory=lambda: deque(maxlen=FIT_INTERVALS))
    _open: Interval | None = None

    @property
    def trusted(self) -> bool:
        """The fit explains enough intervals well enough to split by it, or rules the
        defaults out."""
        if self.fitted_at_s is None:
            return False
        defaults, n = self.defaults_band_rel, self.intervals_used
        if defaults is not None and defaults > TRUST_BAND_REL and n > len(TERMS):
            counted = self.band_rel * math.sqrt(n / (n - len(TERMS)))  # for what it fitted
            if counted <= TRUST_EARLY_GAIN * defaults:
                return True
        if self.intervals_used < TRUST_INTERVALS:
            return False
        if self.band_rel <= TRUST_BAND_REL:
            return True
        return defaults is not None and self.band_rel <= TRUST_GAIN * defaults

    @property
    def band_in_use(self) -> float:
        """The relative residual of the coefficients the split uses: the fit's once
        trusted, else the defaults' on the same intervals (wide before any fit)."""
        if self.trusted or self.defaults_band_rel is None:
            return self.band_rel
        return self.defaults_band_rel

    @property
    def in_use(self) -> Coefficients:
        """The coefficients the split uses: the fit's once trusted, else the defaults."""
        return self.coefficients if self.trusted else self.prior

    # --- what the sampler measured -----------------------------------------------------

    def measured(
        self,
        t0_s: float,
        t1_s: float,
        dynamic_j: float,
        busy_s: float,
        *,
        clean: bool = True,
        steps: float | None = None,
    ) -> None:
        """The interval [t0_s, t1_s] closed: its energy above idle and the seconds any
        request of the backend ran in it; `clean`: no untracked work ran in it; `steps`:
        the engine's steps in it, as its streams showed them (None: not seen)."""
        if t1_s <= t0_s:
            return
        iv = self._open if self._open is not None and self._open.t0_s == t0_s else None
        if iv is None:
            iv = Interval(t0_s, t1_s)
        iv.t1_s, iv.dynamic_j, iv.busy_s, iv.clean = t1_s, dynamic_j, busy_s, clean
        iv.steps_seen = steps
        self._intervals.append(iv)
        self._open = Interval(t1_s, math.inf)

    # --- what the requests did ---------------------------------------------------------

    def work(self, t0_s: float, t1_s: float, *, prompt: float = 0.0, decode: float = 0.0) -> None:
        """`prompt` tokens prefilled and `decode` tokens generated evenly over [t0_s, t1_s]."""
        if prompt <= 0.0 and decode <= 0.0:
            return
        span = t1_s - t0_s
        if span <= 0.0:
            iv = self._find(t1_s)
            if iv is not None:
                iv.prompt_tokens += prompt
                iv.decode_tokens += decode
            return
        seq_s = span if decode > 0.0 else 0.0
        # Newest first: a request's windows are recent, so this touches the few intervals
        # they overlap (O(1) per request in steady state), never the whole window.
        if self._open is not None:
            self._spread(self._open, t0_s, t1_s, span, (prompt, decode, seq_s))
        for iv in reversed(self._intervals):
            if iv.t1_s <= t0_s:
                break
            self._spread(iv, t0_s, t1_s, span, (prompt, decode, seq_s))

    @staticmethod
    def _spread(
        iv: Interval, t0_s: float, t1_s: float, span: float, work: tuple[float, float, float]
    ) -> None:
        """Add the part of `work` (prompt tokens, decoded tokens, decode seconds) spread
        evenly over [t0_s, t1_s] that falls in `iv`."""
        lo, hi = max(t0_s, iv.t0_s), min(t1_s, iv.t1_s)
        if hi > lo:
            f = (hi - lo) / span
            iv.prompt_tokens += work[0] * f
            iv.decode_tokens += work[1] * f
            iv.decode_seq_s += work[2] * f

    def _find(self, t_s: float) -> Interval | None:
        if self._open is not None and t_s >= self._open.t0_s:
            return self._open
        for iv in reversed(self._intervals):
            if iv.t0_s <= t_s <= iv.t1_s:
                return iv
        return None

    # --- the fit -------------------------------------------------------------------------

    def fit(self, complete_before_s: float, now_s: float) -> bool:
        """Refit on the intervals that ended before `complete_before_s` (the start of the
        oldest request still in flight: later intervals miss work not yet reported).
        True when the coefficients were fitted (enough busy intervals)."""
        rows = self.rows(complete_before_s)
        if rows is None:
            return False
        self.refit(rows, now_s)
        return True

    def refit(
        self, rows: tuple[list[tuple[float, float, float]], list[float]], now_s: float
    ) -> None:
        """Fit `rows` (from `rows()`, possibly on another thread) and take the result, one
        assignment per figure."""
        prior = self.prior.as_tuple()
        # What the intervals say alone, then each coefficient they pin down fitted freely
        # and the others held at their defaults.
        alone, _ = fit_coefficients(*rows, prior, prior_weight=IDENTIFIED_PRIOR_WEIGHT)
        errors, identified = identify(*rows, alone, prior)
        theta, band = fit_coefficients(
            *rows, prior, free=identified, prior_weight=IDENTIFIED_PRIOR_WEIGHT
        )
        self.defaults_band_rel = relative_residual(*rows, prior)
        self.coefficients = Coefficients(*theta)
        self.std_errors, self.identified = errors, identified
        self.band_rel = band
        self.intervals_used = len(rows[0])
        self.fitted_at_s = now_s

    def rows(
        self, complete_before_s: float
    ) -> tuple[list[tuple[float, float, float]], list[float]] | None:
        """The features and energies of the complete busy intervals (a copy, for a fit
        made elsewhere), or None when there are too few."""
        xs, ys = [], []
        for iv in self._intervals:
            complete = iv.t1_s <= complete_before_s and iv.clean
            if complete and iv.busy_s > 0.0 and iv.dynamic_j >= 0.0:
                xs.append(iv.features())
                ys.append(iv.dynamic_j)
        return (xs, ys) if len(xs) >= MIN_INTERVALS_TO_FIT else None


def fit_coefficients(
    xs: list[tuple[float, float, float]],
    ys: list[float],
    prior: tuple[float, float, float],
    free: tuple[bool, bool, bool] = (True, True, True),
    prior_weight: float = PRIOR_WEIGHT,
) -> tuple[tuple[float, float, float], float]:
    """Huber-weighted least squares of `ys` on `xs` (no intercept), pulled towards `prior`
    by `prior_weight` pseudo-observations per coefficient, each coefficient >= 0. Returns the
    coefficients and the relative residual (the residuals' robust standard deviation,
    1.4826 x their median absolute value, over the mean interval energy). Absolute
    residuals, not relative ones: a short interval whose work the proxy placed a little
    early or late must not outweigh the long ones."""
    n = len(xs)
    # Each pseudo-observation weighs like an interval of typical size for its feature.
    scale = [sum(x[j] for x in xs) / n or 1.0 for j in range(3)]  # no data: the prior holds
    weights = [1.0] * n
    theta = prior
    # `free[j]` False: coefficient j stays at its prior (the data do not identify it).
    fixed = [None if free[j] else prior[j] for j in range(3)]
    for _ in range(IRLS_ROUNDS):
        # Non-negative: a coefficient the data pushes below zero is held at zero, the
        # most negative first, and the rest solved again (an active set of three).
        active = [f is None for f in fixed]
        theta = _solve(xs, ys, weights, prior, scale, active, fixed, prior_weight)
        while any(t < 0.0 for t in theta):
            active[min(range(3), key=lambda j: theta[j])] = False
            theta = _solve(xs, ys, weights, prior, scale, active, fixed, prior_weight)
        residuals = [y - _dot(x, theta) for x, y in zip(xs, ys, strict=True)]
        sigma = 1.4826 * _median([abs(r) for r in residuals]) or 1e-12
        weights = [
            1.0 if abs(r) <= HUBER_K * sigma else HUBER_K * sigma / abs(r) for r in residuals
        ]
    return theta, relative_residual(xs, ys, theta)


def relative_residual(
    xs: list[tuple[float, float, float]], ys: list[float], theta: tuple[float, float, float]
) -> float:
    """How much of the intervals' energy `theta` leaves unexplained: the residuals'
    robust standard deviation (1.4826 x their median absolute value) over the mean
    interval energy, at most 1."""
    residuals = [abs(y - _dot(x, theta)) for x, y in zip(xs, ys, strict=True)]
    mean_y = sum(abs(y) for y in ys) / len(ys) or 1e-12
    return min(1.0, 1.4826 * _median(residuals) / mean_y)


def identify(
    xs: list[tuple[float, float, float]],
    ys: list[float],
    theta: tuple[float, float, float],
    prior: tuple[float, float, float],
) -> tuple[tuple[float | None, float | None, float | None], tuple[bool, bool, bool]]:
    """Each coefficient's standard error from the intervals alone (no prior): the robust
    residual scale times the square root of the diagonal of (X'X)^-1, which grows with
    collinearity; and whether the data identify it (see below). A coefficient whose
    feature never varies (no prefill seen) has none (None)."""
    residuals = [abs(y - _dot(x, theta)) for x, y in zip(xs, ys, strict=True)]
    sigma = 1.4826 * _median(residuals)
    a = [[sum(x[i] * x[j] for x in xs) for j in range(3)] for i in range(3)]
    errors: list[float | None] = []
    for j in range(3):
        unit = [1.0 if k == j else 0.0 for k in range(3)]
        if a[j][j] <= 0.0:
            errors.append(None)
            continue
        col = _gauss([row[:] for row in a], unit)  # (X'X)^-1 e_j
        var = col[j]
        errors.append(sigma * math.sqrt(var) if var > 0.0 and math.isfinite(var) else None)
    # Identified: pinned down (a small error for its size), or at least clear of the
    # default (more than two errors from it: the data rule the default out, so the fit,
    # however loose, is nearer this host than a figure from another machine).
    identified = tuple(
        e is not None
        and (
            e <= IDENTIFIED_REL_SE * max(abs(theta[j]), abs(prior[j]))
            or abs(theta[j] - prior[j]) > REJECTS_DEFAULT_SE * e
        )
        for j, e in enumerate(errors)
    )
    return (errors[0], errors[1], errors[2]), (identified[0], identified[1], identified[2])


def _dot(x: tuple[float, float, float], t: tuple[float, float, float]) -> float:
    return x[0] * t[0] + x[1] * t[1] + x[2] * t[2]


def _median(values: list[float]) -> float:
    s = sorted(values)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2.0


def _solve(
    xs: list[tuple[float, float, float]],
    ys: list[float],
    weights: list[float],
    prior: tuple[float, float, float],
    scale: list[float],
    active: list[bool],
    fixed: list[float | None] | None = None,
    prior_weight: float = PRIOR_WEIGHT,
) -> tuple[float, float, float]:
    """The ridge solution over the `active` coefficients; the others are 0, or their
    `fixed` value (held: its part of each interval taken out before solving)."""
    held = [0.0, 0.0, 0.0]
    for j, value in enumerate(fixed or ()):
        if value is not None:
            held[j] = value
    a = [[0.0] * 3 for _ in range(3)]
    b = [0.0] * 3
    for x, y, w in zip(xs, ys, weights, strict=True):
        y = y - _dot(x, (held[0], held[1], held[2]))
        for i in range(3):
            b[i] += w * x[i] * y
            for j in range(3):
                a[i][j] += w * x[i] * x[j]
    for j in range(3):
        s2 = prior_weight * scale[j] * scale[j]
        a[j][j] += s2
        b[j] += s2 * prior[j]
    idx = [j for j in range(3) if active[j]]
    out = list(held)
    if idx:
        sol = _gauss([[a[i][j] for j in idx] for i in idx], [b[i] for i in idx])
        for k, j in enumerate(idx):
            out[j] = sol[k]
    return (out[0], out[1], out[2])


def _gauss(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve a small symmetric positive system (partial pivoting)."""
    n = len(b)
    m = [[*row, b[i]] for i, row in enumerate(a)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        if abs(m[c][c]) < 1e-300:
            continue
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            for k in range(c, n + 1):
                m[r][k] -= f * m[c][k]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        if abs(m[r][r]) < 1e-300:
            continue
        x[r] = (m[r][n] - sum(m[r][k] * x[k] for k in range(r + 1, n))) / m[r][r]
    return x


# Streams must have decoded through this much of an interval's busy time for the tokens
# they streamed to count its steps (the rest is extrapolated at their rate).
STEPS_SEEN_COVER = 0.9


def steps_seen(streamed: float, decoder_s: float, decoded_s: float, busy_s: float) -> float | None:
    """An interval's engine steps from its streams: `streamed` tokens over `decoder_s`
    stream-seconds is the step rate (each decoding stream makes one token a step), over
    the `decoded_s` seconds any stream decoded, extrapolated to the `busy_s` the backend
    ran. None when streams decoded through too little of it to tell."""
    if streamed <= 0.0 or decoder_s <= 0.0 or busy_s <= 0.0:
        return None
    if decoded_s < STEPS_SEEN_COVER * busy_s:
        return None
    return streamed / decoder_s * max(decoded_s, busy_s)
