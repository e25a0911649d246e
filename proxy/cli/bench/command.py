"""`energy-proxy bench`: arguments, the proxy it may start, progress, files, the table.

`bench_to_dir` runs `run_bench` to completion or to Ctrl-C and writes the output
directory either way (an interrupted run's files say "interrupted, partial");
`run_bench_command` adds what the command line needs around it.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn

from backends.local.launch import LaunchError, proxy_server
from metering.ratings.score import MIN_REQUESTS_FOR_RATING, rate
from metering.sources.hardware import describe_hardware
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
from proxy.cli.bench.runner import Hooks, Job, ModelRun, Phase, PromptLike, RunOptions, run_bench
from proxy.cli.bench.table import summary_table

DEFAULT_PROXY = "http://127.0.0.1:8080"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(ValueError):
    """A bad argument: exit code 2."""


@dataclass
class Outcome:
    exit_code: int
    summary: dict[str, Any]
    out_dir: Path


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class _Display:
    """A rich progress bar: model, phase, requests done, failures so far."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("[red]{task.fields[failed]}"),
            console=console,
            transient=True,
        )
        self.task: TaskID | None = None
        self.failed = 0

    def __enter__(self) -> _Display:
        self.progress.__enter__()
        self.task = self.progress.add_task("starting", total=None, failed="")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.progress.__exit__(exc_type, exc, tb)

    def phase(self, p: Phase) -> None:
        assert self.task is not None
        what = {
            "pause": f"pausing {p.seconds:g} s to cool down",
            "idle": f"idle baseline, {p.seconds:g} s",
            "warmup": "warming up",
            "measure": "measuring",
        }.get(p.name, p.name)
        self.progress.reset(
            self.task, total=p.total or None, description=f"{p.model}: {what}", completed=0
        )

    def advance(self, r: RequestResult) -> None:
        assert self.task is not None
        self.failed += not r.ok
        failed = f"{self.failed} failed" if self.failed else ""
        self.progress.update(self.task, advance=1, failed=failed)


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
    started_at = _now_iso()
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

    with ResultWriter(out_dir) as writer, _Display(console) as display:

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
            aborted = _describe(exc)

    summary = build_summary(
        results,
        [m.to_dict() for m in model_runs],
        config=config or {},
        started_at=started_at,
        finished_at=_now_iso(),
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


def _describe(exc: BaseException) -> str:
    """The first real error inside task groups' ExceptionGroups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


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
        console.print(
            f"stars: none yet; a model and category is rated from {MIN_REQUESTS_FOR_RATING} "
            "successful requests on"
        )
    if summary["aborted"]:
        console.print(f"aborted, partial: {summary['aborted']}", style="red", markup=False)
    elif summary["interrupted"]:
        console.print("[yellow]interrupted, partial: the files hold what had finished[/]")
    names = ", ".join((REQUESTS_JSONL, REQUESTS_CSV, SUMMARY_JSON, REPORT_HTML))
    console.print(f"results in {out_dir}: {names}")


def _error(message: str) -> None:
    Console(stderr=True).print(f"energy-proxy bench: {message}", style="red", markup=False)


def resolve_models(proxy_url: str, wanted: str | None, api_key: str | None = None) -> list[str]:
    """The models to run: `wanted` (comma-separated), each one the proxy lists, or all."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(f"{proxy_url}/v1/models", headers=headers, timeout=30.0)
    r.raise_for_status()
    listed = [str(m["id"]) for m in r.json().get("data", [])]
    if not wanted:
        if not listed:
            raise UsageError("the proxy lists no models")
        return listed
    names = [m.strip() for m in wanted.split(",") if m.strip()]
    unknown = [m for m in names if m not in listed]
    if not names:
        raise UsageError(f"--models {wanted!r} names no model")
    if unknown:
        raise UsageError(
            f"unknown model(s) {', '.join(unknown)}; the proxy lists: {', '.join(listed) or 'none'}"
        )
    return list(dict.fromkeys(names))


def proxy_hardware(proxy_url: str) -> str:
    """What the proxy measures on, by its `/readyz` ("NVIDIA H100 80GB HBM3 (nvml-counter)"),
    for the report; "" when it cannot be read (the report then simply lacks it)."""
    try:
        doc = httpx.get(f"{proxy_url}/readyz", timeout=10.0).json()
        sources = doc.get("power_sources", [])
        return describe_hardware(
            (str(s.get("name", "")), str(s.get("hardware") or ""), str(s.get("method", "")))
            for s in sources
        )
    except (httpx.HTTPError, ValueError, AttributeError):
        return ""


def run_bench_command(
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
    sweep: bool = False,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
    out: str | None = None,
    console: Console | None = None,
) -> int:
    console = console or Console()
    api_key = api_key or os.environ.get("ENERGY_PROXY_BENCH_API_KEY") or None
    if sweep:
        return _run_sweep(locals())
    if power_source and not backend:
        _error("--power-source applies only to the proxy that --backend starts")
        return EXIT_USAGE
    try:
        prompt_list = load_prompts(prompts, per_category)
        options = RunOptions(
            repetitions=repetitions,
            warmup=warmup,
            concurrency=concurrency,
            idle_s=idle_s,
            pause_s=pause_s,
            max_tokens=max_tokens,
            timeout_s=timeout_s,
            api_key=api_key,
        )
    except (PromptSetError, ValueError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(out) if out else Path("bench-results") / stamp
    with ExitStack() as stack:
        connected = connect(stack, proxy, backend, power_source, models, api_key, out_dir, console)
        if isinstance(connected, int):
            return connected
        proxy_url, model_list = connected
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
            "concurrency": concurrency,
            "idle_s": idle_s,
            "pause_s": pause_s,
            "max_tokens": max_tokens,
            "timeout_s": timeout_s,
            "slo_ttft_ms": slo_ttft_ms,
            "slo_tpot_ms": slo_tpot_ms,
        }
        outcome = bench_to_dir(
            proxy_url,
            model_list,
            prompt_list,
            options,
            out_dir,
            console=console,
            config=config,
            rate=rate,
        )
        return outcome.exit_code


def connect(
    stack: ExitStack,
    proxy: str | None,
    backend: str | None,
    power_source: str | None,
    models: str | None,
    api_key: str | None,
    out_dir: Path,
    console: Console,
) -> tuple[str, list[str]] | int:
    """The proxy to measure through (started on `stack` in front of `backend` if given)
    and the models to run; or the exit code when that cannot be had."""
    proxy_url = (proxy or DEFAULT_PROXY).rstrip("/")
    try:
        if backend:
            out_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ep-bench-")))
            extra = ["--db", str(tmp / "requests.db")]
            if power_source:
                extra += ["--power-source", power_source]
            console.print(f"[bold]Starting energy-proxy[/] in front of {backend}")
            server = stack.enter_context(
                proxy_server(backend, extra_args=extra, log_path=out_dir / "proxy.log")
            )
            proxy_url = server.url
        return proxy_url, resolve_models(proxy_url, models, api_key)
    except LaunchError as exc:
        _error(f"{exc} (log in {out_dir / 'proxy.log'})")
        return EXIT_FAILED
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        _error(f"cannot list models at {proxy_url}: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        _error("interrupted before any request")
        return EXIT_INTERRUPTED


def _run_sweep(args: dict[str, Any]) -> int:
    """`--sweep` belongs to `proxy.cli.bench.sweep.run_sweep_command(**args)`."""
    try:
        module = importlib.import_module("proxy.cli.bench.sweep")
    except ModuleNotFoundError as exc:
        if exc.name != "proxy.cli.bench.sweep":
            raise
        module = None
    command = getattr(module, "run_sweep_command", None)
    if command is None:
        _error("--sweep is not available in this installation")
        return EXIT_USAGE
    code: int = command(**{k: v for k, v in args.items() if k != "sweep"})
    return code
