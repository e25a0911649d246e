"""Which measured setting to recommend: the energy/latency Pareto front and the cheapest
point on it that meets the latency targets. Pure functions, no I/O.

Objectives
----------
Every measured setting has three numbers, all minimised and treated as three separate
objectives (no weighting, no combined latency score):

    energy_j_per_token   joules per generated token
    p90_ttft_s           90th-percentile time to first token, seconds
    mean_tpot_s          mean time per output token after the first, seconds

A point *dominates* another when it is no worse on all three and strictly better on at least
one. The front is every point no other point dominates. Points equal on all three do not
dominate each other, so ties stay on the front together (each one, in input order).

Recommendation
--------------
`recommend` picks, among the points inside the latency targets (p90 TTFT <= slo_ttft_s and
mean TPOT <= slo_tpot_s; None: no target), the one with the lowest J/token; among equal
J/token the lower p90 TTFT, then the lower mean TPOT, then the earlier in the input. That
point is always on the front: anything dominating it would also meet the targets and come
first in that order. It is recommended only if it uses strictly less energy per token than
the baseline (the setting in use now, measured the same way); otherwise there is no
recommendation, and `advise` says why.

The saving is reported against the baseline as percentages of the baseline's numbers:
energy_saving_pct (positive: less energy), ttft_change_pct and tpot_change_pct (positive:
slower), and latency_change_pct, the larger of the two latency changes, i.e. the worst
slowdown the recommendation costs. `Recommendation.message()` renders

    "X % less energy than now, at Y % more latency"

with one decimal (Y = latency_change_pct); when no latency gets worse it reads "at no more
latency" (Y == 0) or "at Y % less latency" (every latency improves). A change relative to a
baseline of 0 s is +inf % (any slowdown) or 0 %.

Outputs must not change: `outputs_identical` compares the answers each setting gave at
temperature 0, prompt by prompt; a recommendation should be shown together with its verdict.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class MeasuredSetting:
    """One benchmarked setting. label: how to show it ("power_limit=250W"); setting: the
    knobs behind it ({"power_limit_w": 250.0, "max_num_seqs": 64}), for callers to apply.

    The three numbers must be finite and >= 0 (ValueError otherwise).
    """

    label: str
    energy_j_per_token: float
    p90_ttft_s: float
    mean_tpot_s: float
    setting: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for name in ("energy_j_per_token", "p90_ttft_s", "mean_tpot_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{self.label}: {name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{self.label}: {name} must be finite and >= 0, got {value}")

    @property
    def objectives(self) -> tuple[float, float, float]:
        """(J/token, p90 TTFT s, mean TPOT s): what the front minimises."""
        return (self.energy_j_per_token, self.p90_ttft_s, self.mean_tpot_s)


def dominates(a: MeasuredSetting, b: MeasuredSetting) -> bool:
    """Whether `a` is no worse than `b` on all three objectives and better on one."""
    pairs = list(zip(a.objectives, b.objectives, strict=True))
    return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)


def _order_key(point: MeasuredSetting) -> tuple[float, float, float]:
    return point.objectives


def pareto_front(points: Iterable[MeasuredSetting]) -> list[MeasuredSetting]:
    """The points no other point dominates, cheapest first: sorted by (J/token, p90 TTFT,
    mean TPOT), ties in input order. O(n^2), for the tens of points a sweep measures."""
    candidates = list(points)
    front = [p for p in candidates if not any(dominates(q, p) for q in candidates)]
    return sorted(front, key=_order_key)


def meets_targets(
    point: MeasuredSetting, slo_ttft_s: float | None, slo_tpot_s: float | None
) -> bool:
    """Whether `point` is inside the latency targets (None: no target; equal is inside)."""
    return (slo_ttft_s is None or point.p90_ttft_s <= slo_ttft_s) and (
        slo_tpot_s is None or point.mean_tpot_s <= slo_tpot_s
    )


def change_pct(new: float, old: float) -> float:
    """(new - old) / old in percent; for old == 0: 0 if new == 0, else +inf."""
    if old == 0:
        return 0.0 if new == 0 else math.inf
    return (new - old) / old * 100.0


@dataclass(frozen=True, slots=True)
class Recommendation:
    """The setting to switch to, and what it saves against the baseline (percent of the
    baseline's values; see the module docstring for the signs)."""

    point: MeasuredSetting
    baseline: MeasuredSetting
    energy_saving_pct: float
    ttft_change_pct: float
    tpot_change_pct: float
    latency_change_pct: float
    front: tuple[MeasuredSetting, ...]

    def message(self) -> str:
        """ "X % less energy than now, at Y % more latency", one decimal each."""
        latency = self.latency_change_pct
        if latency > 0:
            tail = f"at {latency:.1f} % more latency"
        elif latency == 0:
            tail = "at no more latency"
        else:
            tail = f"at {-latency:.1f} % less latency"
        return f"{self.energy_saving_pct:.1f} % less energy than now, {tail}"


@dataclass(frozen=True, slots=True)
class NoRecommendation:
    """Why nothing is recommended; `front` is still the front of what was measured."""

    reason: str
    front: tuple[MeasuredSetting, ...]

    def message(self) -> str:
        return self.reason


def _slo_text(slo_ttft_s: float | None, slo_tpot_s: float | None) -> str:
    parts = []
    if slo_ttft_s is not None:
        parts.append(f"p90 TTFT <= {slo_ttft_s:g} s")
    if slo_tpot_s is not None:
        parts.append(f"mean TPOT <= {slo_tpot_s:g} s")
    return " and ".join(parts) if parts else "no latency target"


def advise(
    points: Sequence[MeasuredSetting],
    baseline: MeasuredSetting,
    slo_ttft_s: float | None,
    slo_tpot_s: float | None,
) -> Recommendation | NoRecommendation:
    """`recommend`, with the reason when there is nothing to recommend."""
    for name, slo in (("slo_ttft_s", slo_ttft_s), ("slo_tpot_s", slo_tpot_s)):
        if slo is not None and not (math.isfinite(slo) and slo >= 0):
            raise ValueError(f"{name} must be finite and >= 0 or None, got {slo}")
    front = tuple(pareto_front(points))
    if not front:
        return NoRecommendation("no setting was measured", front)
    inside = [p for p in front if meets_targets(p, slo_ttft_s, slo_tpot_s)]
    if not inside:
        return NoRecommendation(
            f"no measured setting meets the latency targets ({_slo_text(slo_ttft_s, slo_tpot_s)})",
            front,
        )
    best = inside[0]  # the front is sorted cheapest first, ties broken by latency
    if best.energy_j_per_token >= baseline.energy_j_per_token:
        return NoRecommendation(
            f"no setting within the latency targets ({_slo_text(slo_ttft_s, slo_tpot_s)}) uses "
            f"less energy per token than now ({baseline.label}: "
            f"{baseline.energy_j_per_token:g} J/token; best: {best.label}: "
            f"{best.energy_j_per_token:g} J/token)",
            front,
        )
    ttft_pct = change_pct(best.p90_ttft_s, baseline.p90_ttft_s)
    tpot_pct = change_pct(best.mean_tpot_s, baseline.mean_tpot_s)
    return Recommendation(
        point=best,
        baseline=baseline,
        energy_saving_pct=-change_pct(best.energy_j_per_token, baseline.energy_j_per_token),
        ttft_change_pct=ttft_pct,
        tpot_change_pct=tpot_pct,
        latency_change_pct=max(ttft_pct, tpot_pct),
        front=front,
    )


def recommend(
    points: Sequence[MeasuredSetting],
    baseline: MeasuredSetting,
    slo_ttft_s: float | None,
    slo_tpot_s: float | None,
) -> Recommendation | None:
    """The cheapest front point inside the latency targets, if it beats the baseline's
    J/token; else None (`advise` gives the reason). See the module docstring."""
    result = advise(points, baseline, slo_ttft_s, slo_tpot_s)
    return result if isinstance(result, Recommendation) else None


def outputs_identical(
    outputs_by_setting: Mapping[str, Sequence[str] | Mapping[str, str]],
) -> tuple[bool, list[str]]:
    """Whether every setting gave the same answer to every prompt, and the prompts where not.

    outputs_by_setting: setting label -> its answers, either a mapping prompt id -> text or a
    sequence whose positions are the prompt ids ("0", "1", ...). Texts are compared exactly
    (temperature 0 should reproduce them byte for byte). A prompt that some setting has no
    answer for counts as different. Returns (all identical, differing prompt ids in order of
    first appearance); fewer than two settings are trivially identical.
    """
    tables: list[Mapping[str, str]] = [
        dict(_answers_by_id(answers)) for answers in outputs_by_setting.values()
    ]
    prompt_ids: dict[str, None] = {}
    for table in tables:
        prompt_ids.update(dict.fromkeys(table))
    differing = [
        prompt_id
        for prompt_id in prompt_ids
        if any(prompt_id not in table for table in tables)
        or len({table[prompt_id] for table in tables}) > 1
    ]
    return (not differing, differing)


def _answers_by_id(answers: Sequence[str] | Mapping[str, str]) -> Iterable[tuple[str, str]]:
    """(prompt id, answer) pairs: a mapping's items, or a sequence's positions as ids."""
    if isinstance(answers, Mapping):
        return ((str(k), v) for k, v in answers.items())
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of strings or a mapping, not one string")
    return ((str(i), v) for i, v in enumerate(answers))
