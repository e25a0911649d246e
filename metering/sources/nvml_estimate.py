"""The NVML source's estimates between counter values, as arithmetic on (time, joules)
points and power samples. Pure: no I/O, no clock."""

from __future__ import annotations

from collections.abc import Sequence


def between_samples_j(
    t0_s: float, p0_w: float, t1_s: float, p1_w: float, step_at_s: float | None
) -> float:
    """The energy between two power samples: where a request boundary lies between them
    (the power steps there: a prefill's burst begins at a start and ends at a first
    token), the first sample's power up to it and the second's after; else a trapezoid."""
    if step_at_s is not None and t0_s < step_at_s < t1_s:
        return p0_w * (step_at_s - t0_s) + p1_w * (t1_s - step_at_s)
    return (p0_w + p1_w) / 2.0 * (t1_s - t0_s)


def between_counter_values(
    counter: Sequence[tuple[float, float]], trail: Sequence[tuple[float, float]], t_s: float
) -> float | None:
    """The energy at `t_s` between the two counter values around it, shaped by the
    source's own estimates in between (a prefill's burst between two counter reads lands
    when the estimates placed it, not spread evenly over the 0.75 s between them); linear
    where the estimates do not cover both values. None outside the counter's values."""
    around = bracket(counter, t_s)
    if around is None:
        return None
    (t0, e0), (t1, e1) = around
    if t1 <= t0:
        return e0
    frac = (t_s - t0) / (t1 - t0)
    a, b, x = interpolate(trail, t0), interpolate(trail, t1), interpolate(trail, t_s)
    if a is not None and b is not None and x is not None and b > a:
        frac = min(1.0, max(0.0, (x - a) / (b - a)))
    return e0 + (e1 - e0) * frac


def interpolate(points: Sequence[tuple[float, float]], t_s: float) -> float | None:
    """Linear between the two (time, joules) points around `t_s`; None outside them."""
    around = bracket(points, t_s)
    if around is None:
        return None
    (t0, e0), (t1, e1) = around
    return e0 if t1 <= t0 else e0 + (e1 - e0) * (t_s - t0) / (t1 - t0)


def bracket(
    points: Sequence[tuple[float, float]], t_s: float
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """The two consecutive (time, joules) points around `t_s` (the first at or after it
    and the one before), or None outside them."""
    prev: tuple[float, float] | None = None
    for point in points:
        if point[0] >= t_s:
            return None if prev is None else (prev, point)
        prev = point
    return None
