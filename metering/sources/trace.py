"""Replay a recorded power trace: `trace:PATH`.

The file holds `t_seconds,watts` lines. Blank lines and `#` comments (whole-line or after
the values) are ignored, and the first data line may be a header such as `t_seconds,watts`
(a line in which neither field is a number). `t_seconds` must strictly increase; watts
must be finite and >= 0.

Power is piecewise linear between the points and the trace loops: with period
T = t_last - t_first, an elapsed time e since the source started maps to trace time
t_first + (e mod T). Since the trace loops, the power jumps from watts_last back to
watts_first at each period boundary; repeat the first value at the end for a seamless loop.

The energy is the exact integral of that piecewise-linear power (trapezoids are exact for
linear segments): whole periods times the energy of one period, plus the part of the
current period, found with a bisect over precomputed cumulative integrals, so a read is
O(log n) whatever the trace length and the time since start.
"""

from __future__ import annotations

import math
import os
from bisect import bisect_right
from collections.abc import Sequence

from metering.sources.base import Domain, Reading, SourceUnavailable


def _parse_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_trace_csv(text: str, origin: str) -> list[tuple[float, float]]:
    """Parse trace CSV text into (t_s, power_w) points, validated.

    origin names the file in error messages, which read `origin:LINE: what is wrong`.
    Raises ValueError for an unparsable line, a non-finite t, a t that does not increase,
    watts that are negative or non-finite, or fewer than two points.
    """
    points: list[tuple[float, float]] = []
    seen_data_line = False
    for line_no, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = [field.strip() for field in line.split(",")]
        first_data_line = not seen_data_line
        seen_data_line = True
        if len(fields) != 2:
            raise ValueError(
                f"{origin}:{line_no}: expected 't_seconds,watts', got {raw_line.strip()!r}"
            )
        t_s = _parse_float(fields[0])
        power_w = _parse_float(fields[1])
        if t_s is None and power_w is None and first_data_line:
            continue  # a header line such as "t_seconds,watts"
        if t_s is None or power_w is None:
            raise ValueError(
                f"{origin}:{line_no}: cannot parse {raw_line.strip()!r} as 't_seconds,watts'"
            )
        _check_point(t_s, power_w, points[-1][0] if points else None, f"{origin}:{line_no}")
        points.append((t_s, power_w))
    if len(points) < 2:
        raise ValueError(
            f"{origin}: a trace needs at least 2 't_seconds,watts' points, found {len(points)}"
        )
    return points


def _check_point(t_s: float, power_w: float, prev_t_s: float | None, where: str) -> None:
    """Raise ValueError (prefixed with `where`) if one point is invalid."""
    if not math.isfinite(t_s):
        raise ValueError(f"{where}: t_seconds must be finite, got {t_s!r}")
    if not math.isfinite(power_w) or power_w < 0.0:
        raise ValueError(f"{where}: watts must be finite and >= 0, got {power_w!r}")
    if prev_t_s is not None and t_s <= prev_t_s:
        raise ValueError(
            f"{where}: t_seconds must strictly increase, got {t_s!r} after {prev_t_s!r}"
        )


class TraceSource:
    """A source that replays a piecewise-linear power trace, looped, from clock time start_s.

    energy_j at clock time now_s is the integral of the trace's power over
    [start_s, now_s] (0 before start_s); power_w is the trace's power at that moment.
    """

    name: str = "trace"
    method: str = "trace"
    domain: Domain = "system"

    def __init__(
        self,
        points: Sequence[tuple[float, float]],
        start_s: float,
        *,
        origin: str = "trace points",
    ) -> None:
        """points: (t_seconds, watts) pairs, t strictly increasing, at least two.

        start_s: clock time (s) at which the replay starts at the first point.
        origin: names the data in error messages (from_csv passes the file name).
        """
        if len(points) < 2:
            raise ValueError(f"{origin}: a trace needs at least 2 points, found {len(points)}")
        t_points_s: list[float] = []
        power_points_w: list[float] = []
        for index, (t_raw, power_raw) in enumerate(points):
            t_s = float(t_raw)
            power_w = float(power_raw)
            prev_t_s = t_points_s[-1] if t_points_s else None
            _check_point(t_s, power_w, prev_t_s, f"{origin}: point {index}")
            t_points_s.append(t_s)
            power_points_w.append(power_w)
        # cumulative_j[i] = integral of power from t_points_s[0] to t_points_s[i].
        cumulative_j = [0.0]
        for i in range(1, len(t_points_s)):
            segment_s = t_points_s[i] - t_points_s[i - 1]
            segment_j = 0.5 * (power_points_w[i - 1] + power_points_w[i]) * segment_s
            cumulative_j.append(cumulative_j[-1] + segment_j)
        self.origin = origin
        self.start_s = float(start_s)
        self._t_s = t_points_s
        self._power_w = power_points_w
        self._cumulative_j = cumulative_j
        self.period_s = t_points_s[-1] - t_points_s[0]
        self.period_energy_j = cumulative_j[-1]
        # The largest energy handed out so far: see read().
        self._last_energy_j = 0.0

    @classmethod
    def from_csv(cls, path: str | os.PathLike[str], start_s: float) -> TraceSource:
        """Load a `t_seconds,watts` CSV file (see the module docstring for the format).

        Raises SourceUnavailable if the file is missing or unreadable, and ValueError naming
        the file and line if its content is invalid.
        """
        origin = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as trace_file:
                text = trace_file.read()
        except OSError as exc:
            raise SourceUnavailable(
                f"trace file {origin!r} cannot be read: {exc.strerror or exc}"
            ) from exc
        except UnicodeDecodeError as exc:
            raise ValueError(f"{origin}: not UTF-8 text: {exc}") from exc
        return cls(parse_trace_csv(text, origin), start_s, origin=origin)

    @property
    def mean_power_w(self) -> float:
        """The trace's mean power over one period, watts."""
        return self.period_energy_j / self.period_s

    def energy_at(self, elapsed_s: float) -> tuple[float, float]:
        """(energy_j, power_w) after `elapsed_s` seconds of replay; a pure function of it.

        energy_j integrates the looped trace over [0, elapsed_s] (0 for elapsed_s <= 0);
        power_w is the interpolated power at elapsed_s.
        """
        t_points_s = self._t_s
        power_points_w = self._power_w
        if elapsed_s <= 0.0:
            return 0.0, power_points_w[0]
        # divmod keeps whole periods and the phase consistent with each other.
        whole_periods, phase_s = divmod(elapsed_s, self.period_s)
        t_s = t_points_s[0] + phase_s
        # Segment i spans [t_points_s[i], t_points_s[i + 1]); clamp for rounding at the ends.
        i = min(max(bisect_right(t_points_s, t_s) - 1, 0), len(t_points_s) - 2)
        into_s = t_s - t_points_s[i]
        segment_s = t_points_s[i + 1] - t_points_s[i]
        slope_w_per_s = (power_points_w[i + 1] - power_points_w[i]) / segment_s
        power_w = power_points_w[i] + slope_w_per_s * into_s
        partial_j = self._cumulative_j[i] + 0.5 * (power_points_w[i] + power_w) * into_s
        return whole_periods * self.period_energy_j + partial_j, power_w

    def read(self, now_s: float) -> Reading:
        """Joules replayed since start_s and the trace's power now (watts).

        Rounding at segment and period boundaries can make the exact formula dip by a few
        ULPs; the counter must never decrease, so the largest value so far is kept.
        """
        energy_j, power_w = self.energy_at(now_s - self.start_s)
        if energy_j < self._last_energy_j:
            energy_j = self._last_energy_j
        self._last_energy_j = energy_j
        return Reading(energy_j=energy_j, power_w=power_w, t_s=now_s)

    def close(self) -> None:
        """Nothing to release (the file was read whole at construction)."""

    def __repr__(self) -> str:
        return (
            f"TraceSource(origin={self.origin!r}, points={len(self._t_s)}, "
            f"start_s={self.start_s!r})"
        )
