"""`energy-proxy bench --sweep`: vary what can be varied without changing the answers, find the
energy/latency Pareto front, recommend the cheapest setting inside the latency targets.

What is varied, per model
-------------------------
* client concurrency (a stand-in for the server's batch size): `DEFAULT_CONCURRENCY`, or
  `ENERGY_PROXY_SWEEP_CONCURRENCY="1,2,4"`; the user's `--concurrency` is always included,
  and is the baseline ("now") at the current GPU power limit;
* on NVIDIA hosts, the GPU power limit through NVML (`proxy.cli.bench.power_limit`): the
  `ENERGY_PROXY_SWEEP_POWER_STEPS` (default 4) points of `PowerLimits.sweep_points_w`
  below the current limit, each at two concurrencies only, the baseline's and the highest,
  so a run is len(levels) + 2 x steps settings rather than the full product. A limit is
  set only inside `PowerLimits.applied`, which restores the originals however the block
  ends (error, Ctrl-C, SIGTERM). Without NVML, a GPU or root, only concurrency is swept,
  and the output says why.

Each setting runs the whole prompt set (`repetitions` times, after `warmup` requests; the
idle baseline only before a model's first setting; `pause_s` before every setting but the
first, so the hardware cools). Its numbers come from its successful requests: J/token =
sum of joules / sum of completion tokens, p90 time to first token, mean time per output
token. Only settings that ran to the end without a failed request are candidates for the
front and the recommendation (`proxy.cli.bench.pareto.advise`); the others are shown with the
reason. The answers to temperature-0 prompts (first repetition, by output_sha256) are
compared across the settings measured.

Files in the output directory: sweep.csv (every request, appended as it finishes, with its
setting) and sweep.json (written at the end, also after Ctrl-C, when its status says
"interrupted, partial"; see `sweep_document`).
"""

from __future__ import annotations

import asyncio
import csv
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Protocol

from rich.console import Console
from rich.table import Table

from proxy.cli.bench.command import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    _describe,
    _Display,
    _now_iso,
    connect,
    proxy_hardware,
)
from proxy.cli.bench.files import write_json
from proxy.cli.bench.pareto import (
    MeasuredSetting,
    NoRecommendation,
    Recommendation,
    advise,
    pareto_front,
)
from proxy.cli.bench.pareto import outputs_identical as pareto_outputs_identical
from proxy.cli.bench.prompts import PromptSetError, categories_of, load_prompts
from proxy.cli.bench.results import RESULT_FIELDS, RequestResult, mean, percentile, to_csv_row
from proxy.cli.bench.runner import Hooks, Phase, PromptLike, RunOptions, run_bench

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


def _nvml_power_limits() -> PowerLimitsLike:
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


# ---------------------------------------------------------------------- the run


class _CsvWriter:
    """sweep.csv: one row per request as it finishes, flushed."""

    def __init__(self, path: Path) -> None:
        self._file: IO[str] = open(path, "w", encoding="utf-8", newline="")  # noqa: SIM115
        self._csv = csv.DictWriter(self._file, fieldnames=SWEEP_CSV_FIELDS)
        self._csv.writeheader()
        self._file.flush()

    def add(self, setting: SweepSetting, r: RequestResult) -> None:
        w = setting.power_limit_w
        row = {"setting": setting.label, "power_limit_w": "" if w is None else f"{w:g}"}
        self._csv.writerow({**row, **to_csv_row(r)})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _error(message: str) -> None:
    Console(stderr=True).print(f"energy-proxy bench --sweep: {message}", style="red", markup=False)


def run_sweep_command(
    proxy: str | None = None,
    backend: str | None = None,
    models: str | None = None,
    prompts: str = "builtin:v1",
    per_category: int | None = None,
    warmup: int = 1,
    repetitions: int = 3,
    concurrency: int = 1,
    idle_s: float = 10.0,
    pause_s: float = 10.0,
    max_tokens: int | None = None,
    timeout_s: float = 600.0,
    power_source: str | None = None,
    api_key: str | None = None,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
    out: str | None = None,
    console: Console | None = None,
    *,
    power_limits: Callable[[], PowerLimitsLike] | None = None,
    on_setting: Callable[[str, SweepSetting], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Sweep, print the settings table and the advice, write sweep.json and sweep.csv.

    power_limits: builds the GPU power-limit controller (None: NVML's; tests pass a fake);
    on_setting: called with (model, setting) before each setting runs. Exit codes as `bench`.
    """
    console = console or Console()
    api_key = api_key or os.environ.get("ENERGY_PROXY_BENCH_API_KEY") or None
    if power_source and not backend:
        _error("--power-source applies only to the proxy that --backend starts")
        return EXIT_USAGE
    try:
        for name, slo in (("--slo-ttft-ms", slo_ttft_ms), ("--slo-tpot-ms", slo_tpot_ms)):
            if slo is not None and not (math.isfinite(slo) and slo >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {slo}")
        levels = concurrency_levels(os.environ.get(CONCURRENCY_ENV), concurrency)
        steps = int(os.environ.get(POWER_STEPS_ENV) or DEFAULT_POWER_STEPS)
        prompt_list = load_prompts(prompts, per_category)
        base_options = RunOptions(
            repetitions=repetitions,
            warmup=warmup,
            concurrency=concurrency,
            idle_s=idle_s,
            pause_s=0.0,  # paused here, before every setting but the first
            max_tokens=max_tokens,
            timeout_s=timeout_s,
            api_key=api_key,
        )
    except (PromptSetError, ValueError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(out) if out else Path("bench-results") / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        connected = connect(stack, proxy, backend, power_source, models, api_key, out_dir, console)
        if isinstance(connected, int):
            return connected
        proxy_url, model_list = connected
        power = plan_power(power_limits or _nvml_power_limits, steps)
        config = {
            "proxy": proxy_url,
            "hardware": proxy_hardware(proxy_url),
            "backend": backend,
            "models": model_list,
            "prompts": prompts,
            "per_category": per_category,
            "prompt_count": len(prompt_list),
            "categories": categories_of(prompt_list),
            "repetitions": repetitions,
            "warmup": warmup,
            "baseline_concurrency": concurrency,
            "concurrency_levels": levels,
            "power_steps": steps,
            "idle_s": idle_s,
            "pause_s": pause_s,
            "max_tokens": max_tokens,
            "timeout_s": timeout_s,
            "slo_ttft_ms": slo_ttft_ms,
            "slo_tpot_ms": slo_tpot_ms,
        }
        return _sweep(
            proxy_url,
            model_list,
            prompt_list,
            base_options,
            levels,
            power,
            out_dir,
            config,
            console,
            slo_ttft_s=None if slo_ttft_ms is None else slo_ttft_ms / 1000.0,
            slo_tpot_s=None if slo_tpot_ms is None else slo_tpot_ms / 1000.0,
            pause_s=pause_s,
            on_setting=on_setting,
            sleep=sleep,
        )
    raise AssertionError("unreachable")  # pragma: no cover (mypy: ExitStack may swallow)


def _sweep(
    proxy_url: str,
    model_list: Sequence[str],
    prompt_list: Sequence[PromptLike],
    base_options: RunOptions,
    levels: Sequence[int],
    power: PowerPlan,
    out_dir: Path,
    config: Mapping[str, Any],
    console: Console,
    *,
    slo_ttft_s: float | None,
    slo_tpot_s: float | None,
    pause_s: float,
    on_setting: Callable[[str, SweepSetting], None] | None,
    sleep: Callable[[float], None],
) -> int:
    started_at = _now_iso()
    baseline = SweepSetting(base_options.concurrency)
    plan = plan_settings(levels, base_options.concurrency, power.points_w)
    runs_by_model = {m: [SettingRun(s) for s in plan] for m in model_list}
    power_note = power.reason
    interrupted = False
    aborted = ""
    console.print(
        f"sweeping {len(plan)} settings per model: concurrency "
        f"{', '.join(map(str, levels))} (baseline {baseline.concurrency})"
        + (
            f"; power limits {', '.join(f'{w:g} W' for w in power.points_w)}"
            if power.limits
            else ""
        )
    )
    csv_writer = _CsvWriter(out_dir / SWEEP_CSV)
    first = True
    try:
        with _Display(console) as display:
            for model in model_list:
                runs = runs_by_model[model]
                idle_done = False
                # grouped by power limit, so each limit is set once per model
                for limit_w in [None, *power.points_w]:
                    group = [r for r in runs if r.setting.power_limit_w == limit_w]
                    if limit_w is not None and power_note:
                        for r in group:
                            r.note = f"skipped: {power_note}"
                        continue
                    with ExitStack() as limit_stack:
                        if limit_w is not None and power.limits is not None:
                            try:
                                limit_stack.enter_context(power.limits.applied(limit_w))
                            except PermissionError as exc:  # PowerLimitPermissionError
                                power_note = f"needs root: {exc}"
                                for r in group:
                                    r.note = f"skipped: {power_note}"
                                continue
                            except ValueError as exc:  # a limit a GPU does not accept
                                for r in group:
                                    r.note = f"skipped: {exc}"
                                continue
                        for run in group:
                            if not first and pause_s > 0:
                                display.phase(Phase(model, "pause", seconds=pause_s))
                                sleep(pause_s)
                            first = False
                            if on_setting is not None:
                                on_setting(model, run.setting)
                            opts = replace(
                                base_options,
                                concurrency=run.setting.concurrency,
                                idle_s=0.0 if idle_done else base_options.idle_s,
                            )
                            idle_done = True
                            _run_setting(
                                proxy_url, model, prompt_list, opts, run, csv_writer, display
                            )
    except (KeyboardInterrupt, asyncio.CancelledError):
        interrupted = True
    except Exception as exc:  # keep what finished, say why it stopped
        aborted = _describe(exc)
    finally:
        csv_writer.close()
    status = (
        f"aborted, partial: {aborted}"
        if aborted
        else "interrupted, partial"
        if interrupted
        else "complete"
    )
    doc = sweep_document(
        status,
        config,
        power,
        power_note,
        [
            model_document(
                m, runs_by_model[m], baseline, slo_ttft_s, slo_tpot_s, _t0_ids(prompt_list)
            )
            for m in model_list
        ],
        started_at=started_at,
    )
    write_json(out_dir / SWEEP_JSON, doc)
    print_sweep(console, doc, out_dir)
    return EXIT_FAILED if aborted else EXIT_INTERRUPTED if interrupted else EXIT_OK


def _t0_ids(prompt_list: Sequence[PromptLike]) -> set[str]:
    return {p.id for p in prompt_list if p.temperature == 0}


def _run_setting(
    proxy_url: str,
    model: str,
    prompt_list: Sequence[PromptLike],
    opts: RunOptions,
    run: SettingRun,
    csv_writer: _CsvWriter,
    display: _Display,
) -> None:
    """One setting through `run_bench`; its results kept as they arrive (Ctrl-C keeps them)."""
    run.started = True
    label = f"{model} [{run.setting.label}]"

    def keep(r: RequestResult) -> None:
        run.results.append(r)
        csv_writer.add(run.setting, r)
        display.advance(r)

    hooks = Hooks(on_result=keep, on_phase=lambda p: display.phase(replace(p, model=label)))
    asyncio.run(run_bench(proxy_url, [model], prompt_list, opts, hooks))
    run.complete = True


def sweep_document(
    status: str,
    config: Mapping[str, Any],
    power: PowerPlan,
    power_note: str,
    model_docs: Sequence[Mapping[str, Any]],
    *,
    started_at: str,
) -> dict[str, Any]:
    """sweep.json: {status, started_at, finished_at, config, power_limit, models: [...]}."""
    return {
        "status": status,
        "started_at": started_at,
        "finished_at": _now_iso(),
        "config": dict(config),
        "power_limit": {
            "swept": not power_note,
            "reason": power_note or None,
            "current_w": None
            if power.current_w is None
            else {str(k): v for k, v in power.current_w.items()},
            "points_w": power.points_w,
        },
        "models": list(model_docs),
    }


# ---------------------------------------------------------------------- the terminal


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def settings_table(model_doc: Mapping[str, Any], title: str) -> Table:
    table = Table(title=title)
    table.add_column("setting")
    for header in ("J/token", "p90 TTFT ms", "mean TPOT ms"):
        table.add_column(header, justify="right")
    table.add_column("front", justify="center")
    table.add_column("failed", justify="right")
    table.add_column("status")
    for s in model_doc["settings"]:
        label = s["label"] + (" (now)" if s["baseline"] else "")
        table.add_row(
            label,
            _num(s["energy_j_per_token"]),
            _ms(s["p90_ttft_s"]),
            _ms(s["mean_tpot_s"]),
            "*" if s["on_front"] else "",
            str(s["failures"]),
            s["status"],
        )
    return table


def print_sweep(console: Console, doc: Mapping[str, Any], out_dir: Path) -> None:
    for m in doc["models"]:
        title = f"energy-proxy bench --sweep: {m['model']}"
        if doc["status"] != "complete":
            title += f" ({doc['status']})"
        console.print(settings_table(m, title))
        console.print("* on the Pareto front of J/token against p90 TTFT and mean TPOT")
        rec = m["recommendation"]
        if rec is not None:
            console.print(
                f"recommendation for {m['model']}: {rec['label']}: {rec['message']} "
                f"(now: {m['baseline']})",
                markup=False,
                soft_wrap=True,  # one line to read, grep and paste, whatever the width
            )
        else:
            console.print(
                f"no recommendation for {m['model']}: {m['no_recommendation_reason']}",
                markup=False,
                soft_wrap=True,
            )
        outputs = m["outputs"]
        n = len(outputs["compared_settings"])
        if outputs["identical"]:
            console.print(
                f"outputs at temperature 0: identical across {n} setting(s) "
                f"({outputs['compared_prompts']} prompts compared)"
            )
        else:
            console.print(
                "[yellow]outputs at temperature 0 are NOT identical across the settings;[/] "
                f"differing prompts: {', '.join(outputs['differing_prompt_ids'])}"
            )
    power = doc["power_limit"]
    if power["swept"]:
        console.print(
            "power limit: swept "
            + ", ".join(f"{w:g} W" for w in power["points_w"])
            + " (restored afterwards)"
        )
    else:
        console.print(f"power limit: not swept ({power['reason']})", markup=False)
    if doc["status"] != "complete":
        console.print(f"[yellow]{doc['status']}: the files hold what had finished[/]")
    console.print(f"results in {out_dir}: {SWEEP_JSON}, {SWEEP_CSV}")
