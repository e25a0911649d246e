"""`bench --sweep`'s pure parts: which settings to run, what each measured, the document
of a model's settings with its Pareto front and recommendation, the power-limit plan.
The run itself, its files and its table are in sweep.py."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.cli.bench.pareto import (
    MeasuredSetting,
    NoRecommendation,
    Recommendation,
    advise,
    pareto_front,
)
from proxy.cli.bench.pareto import outputs_identical as pareto_outputs_identical
from proxy.cli.bench.results import RESULT_FIELDS, RequestResult, mean, percentile

DEFAULT_CONCURRENCY = (1, 2, 4, 8)
DEFAULT_POWER_STEPS = 4
CONCURRENCY_ENV = "ENERGY_PROXY_SWEEP_CONCURRENCY"
POWER_STEPS_ENV = "ENERGY_PROXY_SWEEP_POWER_STEPS"
SWEEP_JSON = "sweep.json"
SWEEP_CSV = "sweep.csv"
SWEEP_CSV_FIELDS: tuple[str, ...] = ("setting", "power_limit_w", *RESULT_FIELDS)
NO_NVML = "no NVIDIA GPU / NVML not available"


class PowerLimitsLike(Protocol):
    """What the sweep needs of `proxy.cli.bench.power_limit.PowerLimits` (a fake in the tests)."""

    def sweep_points_w(self, steps: int) -> list[float]: ...
    def current_w(self) -> dict[int, float]: ...
    def applied(self, limit_w: float) -> AbstractContextManager[object]: ...


@dataclass(frozen=True)
class SweepSetting:
    """One point of the sweep. power_limit_w None: the limit in force now, untouched."""

    concurrency: int
    power_limit_w: float | None = None

    @property
    def label(self) -> str:
        if self.power_limit_w is None:
            return f"concurrency {self.concurrency}"
        return f"concurrency {self.concurrency}, {self.power_limit_w:g} W"

    def knobs(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "power_limit_w": self.power_limit_w}


@dataclass
class SettingRun:
    """What one setting measured; `note` says why it was skipped or cut short ("": ran)."""

    setting: SweepSetting
    results: list[RequestResult] = field(default_factory=list)
    started: bool = False
    complete: bool = False
    note: str = ""


# ---------------------------------------------------------------------- pure parts


def concurrency_levels(env_value: str | None, baseline: int) -> list[int]:
    """The concurrencies to sweep, ascending, the baseline always among them.

    env_value: "1,2,4" (ENERGY_PROXY_SWEEP_CONCURRENCY) or None/"" for DEFAULT_CONCURRENCY.
    Raises ValueError for anything but positive integers.
    """
    levels: list[int] = list(DEFAULT_CONCURRENCY)
    if env_value and env_value.strip():
        try:
            levels = [int(x) for x in env_value.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"{CONCURRENCY_ENV}={env_value!r}: not integers") from None
        if not levels or any(c < 1 for c in levels):
            raise ValueError(f"{CONCURRENCY_ENV}={env_value!r}: concurrencies must be >= 1")
    return sorted({*levels, baseline})


def plan_settings(
    levels: Sequence[int], baseline: int, power_points_w: Sequence[float]
) -> list[SweepSetting]:
    """Every concurrency at the current limit, then each power limit at the baseline's and
    the highest concurrency (not the full product: keeps the run a sane size)."""
    settings = [SweepSetting(c) for c in levels]
    at = sorted({baseline, max(levels)})
    settings += [SweepSetting(c, w) for w in power_points_w for c in at]
    return settings


def setting_numbers(results: Sequence[RequestResult]) -> dict[str, Any]:
    """A setting's numbers from its requests; the three objectives come from successful ones
    (None when there are none, or no tokens: such a setting is not on any front)."""
    ok = [r for r in results if r.ok]
    metered = [r for r in ok if r.joules is not None and r.completion_tokens is not None]
    joules = sum(r.joules or 0.0 for r in metered)
    tokens = sum(r.completion_tokens or 0 for r in metered)
    return {
        "requests": len(results),
        "failures": len(results) - len(ok),
        "joules": joules,
        "completion_tokens": tokens,
        "energy_j_per_token": joules / tokens if tokens > 0 else None,
        "p90_ttft_s": percentile([r.ttft_s for r in ok if r.ttft_s is not None], 90),
        "mean_tpot_s": mean([r.tpot_s for r in ok if r.tpot_s is not None]),
    }


def measured_setting(run: SettingRun) -> MeasuredSetting | None:
    """The setting as `proxy.cli.bench.pareto` sees it, or None when it has no complete numbers."""
    n = setting_numbers(run.results)
    if n["energy_j_per_token"] is None or n["p90_ttft_s"] is None or n["mean_tpot_s"] is None:
        return None
    return MeasuredSetting(
        run.setting.label,
        n["energy_j_per_token"],
        n["p90_ttft_s"],
        n["mean_tpot_s"],
        run.setting.knobs(),
    )


def setting_status(run: SettingRun) -> str:
    """ "measured" for a candidate; else why the setting is not compared."""
    failures = sum(not r.ok for r in run.results)
    if run.note:
        return run.note
    if not run.started:
        return "not run"
    if not run.complete:
        return "partial: not compared"
    if failures:
        return f"{failures} failed: not compared"
    if measured_setting(run) is None:
        return "no successful measurement"
    return "measured"


def compare_outputs(runs: Sequence[SettingRun], temperature_zero_ids: set[str]) -> dict[str, Any]:
    """Whether the settings gave the same answers to the temperature-0 prompts.

    Per setting, the first repetition's successful answers (their sha256). Only prompts every
    compared setting answered are compared; the others are listed as not compared (a failed
    request is not a changed answer).
    """
    by_setting: dict[str, dict[str, str]] = {}
    for run in runs:
        answers = {
            r.prompt_id: r.output_sha256
            for r in run.results
            if r.ok and r.repetition == 0 and r.prompt_id in temperature_zero_ids
        }
        if answers:
            by_setting[run.setting.label] = answers
    all_ids: dict[str, None] = {}
    for answers in by_setting.values():
        all_ids.update(dict.fromkeys(answers))
    common = [i for i in all_ids if all(i in a for a in by_setting.values())]
    tables = {label: {i: a[i] for i in common} for label, a in by_setting.items()}
    identical, differing = pareto_outputs_identical(tables)
    return {
        "identical": identical,
        "compared_settings": list(by_setting),
        "compared_prompts": len(common),
        "differing_prompt_ids": differing,
        "not_compared_prompt_ids": [i for i in all_ids if i not in common],
    }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no Infinity


def model_document(
    model: str,
    runs: Sequence[SettingRun],
    baseline: SweepSetting,
    slo_ttft_s: float | None,
    slo_tpot_s: float | None,
    temperature_zero_ids: set[str],
) -> dict[str, Any]:
    """One model's part of sweep.json: every setting, the front, the advice, the outputs.

    Only settings that ran to the end without a failed request are candidates for the front
    and the advice: a setting's low J/token may come from work it did not do.
    """
    statuses = {run.setting.label: setting_status(run) for run in runs}
    points = {
        label: point
        for label, point in ((r.setting.label, measured_setting(r)) for r in runs)
        if point is not None and statuses[label] == "measured"
    }
    advice: Recommendation | NoRecommendation
    base_point = points.get(baseline.label)
    if base_point is None:
        advice = NoRecommendation(
            f"the baseline ({baseline.label}) has nothing to compare with: "
            f"{statuses.get(baseline.label, 'not run')}",
            tuple(pareto_front(points.values())),  # still worth showing
        )
    else:
        advice = advise(list(points.values()), base_point, slo_ttft_s, slo_tpot_s)
    front_labels = [p.label for p in advice.front]
    settings = [
        {
            "label": run.setting.label,
            **run.setting.knobs(),
            "baseline": run.setting == baseline,
            "status": statuses[run.setting.label],
            **setting_numbers(run.results),
            "on_front": run.setting.label in front_labels,
        }
        for run in runs
    ]
    recommendation: dict[str, Any] | None = None
    if isinstance(advice, Recommendation):
        recommendation = {
            "label": advice.point.label,
            "setting": dict(advice.point.setting),
            "energy_saving_pct": _finite(advice.energy_saving_pct),
            "ttft_change_pct": _finite(advice.ttft_change_pct),
            "tpot_change_pct": _finite(advice.tpot_change_pct),
            "latency_change_pct": _finite(advice.latency_change_pct),
            "message": advice.message(),
        }
    return {
        "model": model,
        "baseline": baseline.label,
        "settings": settings,
        "front": front_labels,
        "recommendation": recommendation,
        "no_recommendation_reason": advice.reason if isinstance(advice, NoRecommendation) else None,
        "outputs": compare_outputs(runs, temperature_zero_ids),
    }


# ---------------------------------------------------------------------- power limits


@dataclass
class PowerPlan:
    limits: PowerLimitsLike | None
    points_w: list[float]
    current_w: dict[int, float] | None
    reason: str  # why not swept ("" when swept)


def nvml_power_limits() -> PowerLimitsLike:
    from proxy.cli.bench.power_limit import PowerLimits  # NVML only on demand

    return PowerLimits()


def plan_power(factory: Callable[[], PowerLimitsLike], steps: int) -> PowerPlan:
    """The power limits to sweep: the points below the current limit, or why none."""
    from proxy.cli.bench.power_limit import PowerLimitError

    try:
        limits = factory()
        current = limits.current_w()
        points = limits.sweep_points_w(steps)
    except (PowerLimitError, ImportError, OSError):
        return PowerPlan(None, [], None, NO_NVML)
    except ValueError as exc:
        return PowerPlan(None, [], None, str(exc))
    now_w = min(current.values()) if current else math.inf
    below = [w for w in points if w < now_w]
    if not below:
        return PowerPlan(
            None, [], current, "the current limit is already the lowest the GPUs accept"
        )
    return PowerPlan(limits, below, current, "")
