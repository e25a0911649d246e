"""`energy-proxy bench`: arguments, the proxy it may start, progress, files, the table.

`bench_to_dir` runs `run_bench` to completion or to Ctrl-C and writes the output
directory either way (an interrupted run's files say "interrupted, partial");
`run_bench_command` adds what the command line needs around it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from metering.ratings.score import MIN_REQUESTS_FOR_RATING, rate
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
from proxy.cli.bench.files import (
    REPORT_HTML,
    REQUESTS_CSV,
    REQUESTS_JSONL,
    SUMMARY_JSON,
    ResultWriter,
    write_summary,
)
from proxy.cli.bench.prompts import PromptSetError, categories_of, load_prompts
from proxy.cli.bench.results import Rater, RequestResult, build_summary
from proxy.cli.bench.runner import Hooks, Job, ModelRun, PromptLike, RunOptions, run_bench
from proxy.cli.bench.sweep import run_sweep_command
from proxy.cli.bench.table import summary_table
from proxy.cli.output import output_console
from proxy.cli.signals import interrupt_on_signals


@dataclass
class Outcome:
    exit_code: int
    summary: dict[str, Any]
    out_dir: Path


def bench_to_dir(
    proxy_url: str,
    models: Sequence[str],
    prompts: Sequence[PromptLike],
    options: RunOptions,
    out_dir: Path,
    *,
    console: Console,
    config: Mapping[str, Any] | None = None,
    on_result: Callable[[RequestResult], None] | None = None,
    request_headers: Callable[[Job], Mapping[str, str]] | None = None,
    rate: Rater | None = None,
) -> Outcome:
    """Run the benchmark; write requests as they finish, then the summary and the report.

    Ctrl-C (or a KeyboardInterrupt raised by `on_result`) stops the run; what finished is
    kept and summarised, the summary says "interrupted, partial", the exit code is 130.
    """
    started_at = now_iso()
    results: list[RequestResult] = []
    model_runs: list[ModelRun] = []
    main_task: list[asyncio.Task[Any]] = []
    interrupted = False
    aborted = ""

    def guarded(fn: Callable[[Any], None]) -> Callable[[Any], None]:
        # A KeyboardInterrupt inside a callback would tear the event loop down mid-step;
        # stop the run as asyncio.run's own Ctrl-C handling does: cancel the main task.
        def call(arg: Any) -> None:
            nonlocal interrupted
            try:
                fn(arg)
            except KeyboardInterrupt:
                interrupted = True
                for t in main_task:
                    t.cancel()

        return call

    with ResultWriter(out_dir) as writer, Display(console) as display:

        def keep(r: RequestResult) -> None:
            results.append(r)
            writer.add(r)
            display.advance(r)
            if on_result is not None:
                on_result(r)

        hooks = Hooks(
            on_result=guarded(keep),
            on_phase=guarded(display.phase),
            on_model=model_runs.append,
            request_headers=request_headers,
        )

        async def main() -> None:
            task = asyncio.current_task()
            if task is not None:
                main_task.append(task)
            await run_bench(proxy_url, models, prompts, options, hooks)

        try:
            asyncio.run(main())
        except (KeyboardInterrupt, asyncio.CancelledError):
            interrupted = True
        except Exception as exc:  # keep and summarise what finished, then say why it stopped
            aborted = describe_error(exc)

    summary = build_summary(
        results,
        [m.to_dict() for m in model_runs],
        config=config or {},
        started_at=started_at,
        finished_at=now_iso(),
        interrupted=interrupted,
        aborted=aborted,
        models=models,
        categories=categories_of(prompts),
        rate=rate,
    )
    write_summary(out_dir, summary)
    _print_outcome(console, summary, out_dir)
    code = EXIT_FAILED if aborted else EXIT_INTERRUPTED if interrupted else EXIT_OK
    return Outcome(code, summary, out_dir)


def _print_outcome(console: Console, summary: Mapping[str, Any], out_dir: Path) -> None:
    rows = summary["rows"]
    title = "energy-proxy bench: energy per request, by model and category"
    if summary["interrupted"]:
        title += f" ({summary['status']})"
    console.print(summary_table(rows, title=title, width=console.width))
    for m in summary["models"]:
        idle = m["idle_watts"]
        console.print(
            f"{m['model']}: idle {'-' if idle is None else f'{idle:.4g} W'}, "
            f"{m['requests']} requests ({m['failures']} failed) in {m['wall_s']:.1f} s"
        )
    totals = summary["totals"]
    if totals["failures"]:
        console.print(
            f"[red]{totals['failures']} of {totals['requests']} requests failed[/] "
            "(counted per model and category; reasons in summary.json)"
        )
    if any("estimate" in str(r.get("methods")) for r in rows):
        console.print(
            "[yellow]cpu-estimate: no power sensor is readable here, so these joules are an "
            "ESTIMATE from CPU utilisation, not a measurement.[/]"
        )
    if rows and "stars" in rows[0] and all(r["stars"] is None for r in rows):
        most = max(int(r.get("count") or 0) for r in rows)
        console.print(
            f"stars: none yet. A model and category is rated once it has "
            f"{MIN_REQUESTS_FOR_RATING} successful requests; this run had at most {most} "
            "(raise --repetitions or --per-category)."
        )
    if summary["aborted"]:
        console.print(f"aborted, partial: {summary['aborted']}", style="red", markup=False)
    elif summary["interrupted"]:
        console.print("[yellow]interrupted, partial: the files hold what had finished[/]")
    names = ", ".join((REQUESTS_JSONL, REQUESTS_CSV, SUMMARY_JSON, REPORT_HTML))
    console.print(f"results in {out_dir}: {names}")


def run_bench_command(options: BenchOptions, console: Console | None = None) -> int:
    """`energy-proxy bench` (and, with `--sweep`, `bench --sweep`); the exit code."""
    console = console or output_console()
    options = options.with_env()
    if options.sweep:
        return run_sweep_command(options, console)
    # SIGTERM and SIGHUP as Ctrl-C: the proxy `--backend` started is stopped, exit 130
    # (during the run, what finished is kept: "interrupted, partial").
    with interrupt_on_signals():
        return _run_bench(options, console)


def _run_bench(options: BenchOptions, console: Console) -> int:
    problem = options.usage_problem()
    if problem:
        _error(problem)
        return EXIT_USAGE
    try:
        prompt_list = load_prompts(options.prompts, options.per_category)
        run_options = options.run_options()
    except (PromptSetError, ValueError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    out_dir = options.out_dir()
    with ExitStack() as stack:
        connected = connect(stack, options, out_dir, console)
        if isinstance(connected, int):
            return connected
        proxy_url, model_list = connected
        config = {
            "proxy": proxy_url,
            "hardware": proxy_hardware(proxy_url),
            "backend": options.backend,
            "models": model_list,
            "prompts": options.prompts,
            "per_category": options.per_category,
            "prompt_count": len(prompt_list),
            "categories": categories_of(prompt_list),
            "repetitions": options.repetitions,
            "warmup": options.warmup,
            "concurrency": options.concurrency,
            "idle_s": options.idle_s,
            "pause_s": options.pause_s,
            "max_tokens": options.max_tokens,
            "timeout_s": options.timeout_s,
            "slo_ttft_ms": options.slo_ttft_ms,
            "slo_tpot_ms": options.slo_tpot_ms,
        }
        outcome = bench_to_dir(
            proxy_url,
            model_list,
            prompt_list,
            run_options,
            out_dir,
            console=console,
            config=config,
            rate=rate,
        )
        return outcome.exit_code


def _error(message: str) -> None:
    print_error("energy-proxy bench", message)
