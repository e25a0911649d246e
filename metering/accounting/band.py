"""The band around a request's joules: a central interval meant to hold its true share
90 % of the time (`joules_low`, `joules_high`). Pure: no I/O, no clock.

A request's joules are the measured energy of the intervals it ran in, split by weights
(ledger.py); the measurement is close to exact, the split is the estimate. Its error has
its own sources, each turned into joules for this request:

- the cost model: the split prices each request's work by three coefficients (the fixed
  cost F of a step, c_prefill, c_decode). The ledger tracks, for this request, how its
  joules move per unit of each coefficient's logarithm (its sensitivities: a request
  alone, or beside requests doing the same work, has none; a long prompt beside decoders
  has much). Each is multiplied by how uncertain that logarithm is: the spread of hosts
  around the defaults (`PRIOR_LOG_SD`) while the defaults split, and for a coefficient the
  fit does not identify; the fit's relative standard error for one it does;
- the sensor's resolution: half its period (a counter's, or the window a power reading
  averages over) over the request's own time (a short request beside others is placed
  within the period at best), and the energy drawn while it ran over up to a period of
  its time, which may have fallen on the wrong side of its start or end;
- what the cost model leaves unexplained in the intervals (the fit's relative residual);
- the queue: while the backend's capacity is not known for sure (inferred from answers,
  or unknown), a request that waited may have been charged for time it waited, or not
  for time it ran (its time held waiting, at its running rate), and one that ran may
  have shared with requests that in truth waited (the others' joules beside it).

They are combined in quadrature, each with its factor (`BandScale`), and capped at 1. The
factors, one set per state (defaults or fitted, capacity known or unsure, and the class of
the backend's sensors: `sensor_class`), are calibrated by bench/band.py on one half of a
wide bench of simulated hosts
(fixed cost x0.25 to x4, prefill x0.25 to x4, decode x0.5 to x4; six engines; three loads;
three sensors; gauges or none; cold or warm) and its coverage reported on the other half:
docs/fairness.md has the tables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

# How far a host's coefficient may be from the default, as a log-normal spread: x1/4 to x4
# holds 90 % of hosts (the bench's range for the fixed cost and prefill; decode's x1/2 to
# x4 is inside it).
PRIOR_LOG_SD = math.log(4.0) / 1.645
# A fitted coefficient is a linear model's answer, not the host's: the engine's steps are
# not linear in busy seconds and tokens (a batch's step grows with it), so the fit leans
# by more than its standard error says. This much of a spread stays however tight the fit.
FIT_FLOOR_LOG_SD = 0.35
# A request told next to nothing whose work may have cost more: its band may reach far
# above its joules, never without a bound.
MAX_BAND_REL = 100.0


@dataclass(frozen=True, slots=True)
class BandTerms:
    """One request's sources of error, each in joules (band.py), its joules, and the
    state it was split in (which of the calibrated `SCALES` applies)."""

    joules: float = 0.0
    coefficients_j: float = 0.0
    resolution_j: float = 0.0  # its joules' share of the sensor's resolution
    own_work_j: float = 0.0  # its own work's (it may fall outside its own time)
    residual_j: float = 0.0
    queue_j: float = 0.0
    crowd_j: float = 0.0  # the others' joules beside it, while the capacity is unsure
    # Joules the sensor may have placed on the wrong side of its start or end: the energy
    # drawn while it ran over up to a period of its time (in joules, not a fraction of its
    # own: a 5 J chat beside a 100 J prefill is off by a part of the prefill's).
    placement_j: float = 0.0
    state: str = "defaults, capacity known, exact counter"


@dataclass(frozen=True, slots=True)
class BandScale:
    """The calibrated factor of each source (bench/band.py), for one state of the fit."""

    coefficients: float = 1.0
    resolution: float = 1.0
    own_work: float = 1.0
    residual: float = 1.0
    queue: float = 1.0
    crowd: float = 1.0
    placement: float = 0.0


# How the backend's sensors place energy in time (`sensor_class`): a counter read often
# enough to be exact, instant power samples between a coarse counter's moves (an H100's
# NVML), or a power reading that is a one-second mean (NVML without the instant field).
EXACT, SAMPLED, AVERAGED = "exact counter", "power sampled", "power averaged"
SENSOR_CLASSES = (EXACT, SAMPLED, AVERAGED)
# The states a request can be split in: the defaults or the fit, the backend's capacity
# known (configured, or learnt from its gauges) or not (inferred, or unknown), and its
# sensors' class: each has its own calibrated factors.
STATES = tuple(
    f"{fit}, capacity {queue}, {sensor}"
    for fit in ("defaults", "early fit", "fitted")
    for queue in ("known", "unsure")
    for sensor in SENSOR_CLASSES
)
# Calibrated by `python -m bench.band` on its calibration half (each state's factors;
# docs/fairness.md has the run and the coverage on the other half).
_BY_FIT: dict[str, BandScale] = {
    "defaults, capacity known": BandScale(7.02, 0.0, 0.0, 0.88, 1.76, 1.76),
    "defaults, capacity unsure": BandScale(1.21, 1.21, 0.30, 0.60, 0.0, 0.08),
    "fitted, capacity known": BandScale(12.34, 0.0, 24.67, 1.54, 6.17, 6.17),
    "fitted, capacity unsure": BandScale(2.00, 2.00, 4.01, 4.01, 4.01, 0.0),
}
SCALES: dict[str, BandScale] = {
    st: _BY_FIT[st.rsplit(", ", 1)[0].replace("early fit", "fitted")] for st in STATES
}


def state_of(fitted: bool, queue_known: bool, sensor: str = EXACT, early: bool = False) -> str:
    """The state's name; `early`: the fit is used on fewer intervals than a settled one
    (cost_model.TRUST_INTERVALS), since it ruled the defaults out."""
    fit = ("early fit" if early else "fitted") if fitted else "defaults"
    return f"{fit}, capacity {'known' if queue_known else 'unsure'}, {sensor}"


def sensor_class(counter_period_s: float, power_window_s: float) -> str:
    """The class of a backend's sensors from the longest counter period among them and
    the longest window their power readings average over (0: instant samples)."""
    if power_window_s >= 0.5:
        return AVERAGED
    return SAMPLED if counter_period_s > 0.0 else EXACT


def coefficient_log_sds(
    fitted: bool,
    coefficients: tuple[float, float, float],
    std_errors: tuple[float | None, float | None, float | None],
    identified: tuple[bool, bool, bool],
) -> tuple[float, float, float]:
    """How uncertain the logarithm of each coefficient in use is: the prior spread unless
    the fit splits (`fitted`) and identifies it; then its relative standard error beside
    FIT_FLOOR_LOG_SD (never more than the prior's)."""
    out = []
    for value, err, known in zip(coefficients, std_errors, identified, strict=True):
        if fitted and known and err is not None and value > 0.0:
            out.append(min(PRIOR_LOG_SD, math.hypot(err / value, FIT_FLOOR_LOG_SD)))
        else:
            out.append(PRIOR_LOG_SD)
    return out[0], out[1], out[2]


def band_terms(
    *,
    joules: float,
    sensitivity_j: tuple[float, float, float],
    log_sds: tuple[float, float, float],
    own_work_j: float,
    period_s: float,
    duration_s: float,
    residual_rel: float,
    waited_s: float,
    queue_known: bool,
    exposure_j: float = 0.0,
    dynamic_j: float = 0.0,
    fitted: bool = False,
    sensor: str = EXACT,
    early: bool = False,
) -> BandTerms:
    """The request's sources of error in joules (module docstring). `own_work_j`: what
    the cost model prices its own work at (its prompt and its tokens); `period_s`: the
    time within which the sensors place energy (their counter's period, or the window
    their power readings average over)."""
    coef_j = math.sqrt(sum((s * sd) ** 2 for s, sd in zip(sensitivity_j, log_sds, strict=True)))
    # A request shorter than the sensor's period may see its own work land outside its
    # time, and others' inside it: up to half a period's worth of its time, in so far as
    # others ran beside it (alone, all the energy of its time is its own wherever it fell).
    coarse = 0.5 * period_s / max(duration_s, period_s) if period_s > 0.0 else 0.0
    if exposure_j > 0.0:
        coarse *= min(1.0, max(0.0, exposure_j - dynamic_j) / exposure_j)
    else:
        coarse = 0.0
    # Energy the sensor may have placed on the wrong side of its start or end: all that
    # ran beside it (its own included: a request alone is off by its neighbours' in time)
    # over up to a period of its time.
    placement_j = exposure_j * min(1.0, period_s / duration_s) if duration_s > 0.0 else 0.0
    queue_j = crowd_j = 0.0
    if not queue_known:
        if 0.0 < waited_s < duration_s:
            # Charged nothing while held waiting, at its running rate if it ran instead.
            queue_j = joules * waited_s / (duration_s - waited_s)
        # Shared with requests that may have been waiting (the capacity unknown or only
        # inferred): up to all the energy drawn while it ran may have been its own.
        crowd_j = max(0.0, exposure_j - dynamic_j)
    return BandTerms(
        joules=joules,
        coefficients_j=coef_j,
        resolution_j=coarse * joules,
        own_work_j=coarse * own_work_j,
        residual_j=residual_rel * joules,
        queue_j=queue_j,
        crowd_j=crowd_j,
        placement_j=placement_j,
        state=state_of(fitted, queue_known, sensor, early),
    )


def band_j(terms: BandTerms, scale: BandScale) -> float:
    """The band's half-width in joules: the scaled sources in quadrature."""
    return math.sqrt(
        (scale.coefficients * terms.coefficients_j) ** 2
        + (scale.resolution * terms.resolution_j) ** 2
        + (scale.own_work * terms.own_work_j) ** 2
        + (scale.residual * terms.residual_j) ** 2
        + (scale.queue * terms.queue_j) ** 2
        + (scale.crowd * terms.crowd_j) ** 2
        + (scale.placement * terms.placement_j) ** 2
    )


def band_rel(terms: BandTerms, scales: Mapping[str, BandScale]) -> float:
    """The half-width relative to the joules (`joules_low` = joules x (1 - it), at least
    0; `joules_high` = joules x (1 + it)) with the factors of the request's state, at most
    MAX_BAND_REL."""
    if terms.joules <= 0.0:
        return MAX_BAND_REL
    return min(MAX_BAND_REL, band_j(terms, scales[terms.state]) / terms.joules)
