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
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.table import Table

from proxy.cli.bench.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    BenchOptions,
    Display,
    connect,
    describe_error,
    now_iso,
    print_error,
    proxy_hardware,
)
from proxy.cli.bench.files import write_json
from proxy.cli.bench.prompts import PromptSetError, categories_of, load_prompts
from proxy.cli.bench.results import RequestResult, to_csv_row
from proxy.cli.bench.runner import Hooks, Phase, PromptLike, RunOptions, run_bench
from proxy.cli.bench.sweep_plan import (
    CONCURRENCY_ENV,
    DEFAULT_POWER_STEPS,
    POWER_STEPS_ENV,
    SWEEP_CSV,
    SWEEP_CSV_FIELDS,
    SWEEP_JSON,
    PowerLimitsLike,
    PowerPlan,
    SettingRun,
    SweepSetting,
    concurrency_levels,
    model_document,
    nvml_power_limits,
    plan_power,
    plan_settings,
)
from proxy.cli.output import output_console

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
    print_error("energy-proxy bench --sweep", message)


def run_sweep_command(
    options: BenchOptions,
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
    console = console or output_console()
    options = options.with_env()
    problem = options.usage_problem()
    if problem:
        _error(problem)
        return EXIT_USAGE
    o = options
    try:
        for name, slo in (("--slo-ttft-ms", o.slo_ttft_ms), ("--slo-tpot-ms", o.slo_tpot_ms)):
            if slo is not None and not (math.isfinite(slo) and slo >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {slo}")
        levels = concurrency_levels(os.environ.get(CONCURRENCY_ENV), o.concurrency)
        steps = int(os.environ.get(POWER_STEPS_ENV) or DEFAULT_POWER_STEPS)
        prompt_list = load_prompts(o.prompts, o.per_category)
        # paused here, before every setting but the first
        base_options = o.run_options(pause_s=0.0)
    except (PromptSetError, ValueError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    out_dir = o.out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        connected = connect(stack, o, out_dir, console)
        if isinstance(connected, int):
            return connected
        proxy_url, model_list = connected
        power = plan_power(power_limits or nvml_power_limits, steps)
        config = {
            "proxy": proxy_url,
            "hardware": proxy_hardware(proxy_url),
            "backend": o.backend,
            "models": model_list,
            "prompts": o.prompts,
            "per_category": o.per_category,
            "prompt_count": len(prompt_list),
            "categories": categories_of(prompt_list),
            "repetitions": o.repetitions,
            "warmup": o.warmup,
            "baseline_concurrency": o.concurrency,
            "concurrency_levels": levels,
            "power_steps": steps,
            "idle_s": o.idle_s,
            "pause_s": o.pause_s,
            "max_tokens": o.max_tokens,
            "timeout_s": o.timeout_s,
            "slo_ttft_ms": o.slo_ttft_ms,
            "slo_tpot_ms": o.slo_tpot_ms,
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
            slo_ttft_s=None if o.slo_ttft_ms is None else o.slo_ttft_ms / 1000.0,
            slo_tpot_s=None if o.slo_tpot_ms is None else o.slo_tpot_ms / 1000.0,
            pause_s=o.pause_s,
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
    started_at = now_iso()
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
        with Display(console) as display:
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
        aborted = describe_error(exc)
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
    display: Display,
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
        "finished_at": now_iso(),
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
