"""What `energy-proxy bench` and `bench --sweep` share: the options, the exit codes, the
proxy to measure through (started if asked), the progress display."""

from __future__ import annotations

import os
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn

from backends.local.launch import LaunchError, proxy_server
from metering.sources.hardware import describe_hardware
from proxy.cli.bench.results import RequestResult
from proxy.cli.bench.runner import Phase, RunOptions
from proxy.cli.output import output_console

DEFAULT_PROXY = "http://127.0.0.1:8080"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
API_KEY_ENV = "ENERGY_PROXY_BENCH_API_KEY"


class UsageError(ValueError):
    """A bad argument: exit code 2."""


@dataclass(frozen=True)
class BenchOptions:
    """Everything `energy-proxy bench` is told (the flags of docs/INTERFACE.md)."""

    proxy: str | None = None
    backend: str | None = None
    models: str | None = None
    prompts: str = "builtin:v1"
    per_category: int | None = None
    warmup: int = 1
    repetitions: int = 3
    concurrency: int = 1
    idle_s: float = 10.0
    pause_s: float = 10.0
    max_tokens: int | None = None
    timeout_s: float = 600.0
    power_source: str | None = None
    api_key: str | None = None
    sweep: bool = False
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    out: str | None = None

    def with_env(self) -> BenchOptions:
        """The API key from the environment when the flags gave none."""
        return replace(self, api_key=self.api_key or os.environ.get(API_KEY_ENV) or None)

    def run_options(self, **overrides: Any) -> RunOptions:
        """How each request is sent; ValueError for a bad combination."""
        fields: dict[str, Any] = {
            "repetitions": self.repetitions,
            "warmup": self.warmup,
            "concurrency": self.concurrency,
            "idle_s": self.idle_s,
            "pause_s": self.pause_s,
            "max_tokens": self.max_tokens,
            "timeout_s": self.timeout_s,
            "api_key": self.api_key,
        }
        return RunOptions(**{**fields, **overrides})

    def out_dir(self) -> Path:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path(self.out) if self.out else Path("bench-results") / stamp

    def usage_problem(self) -> str:
        """Why these options cannot run ("" when they can)."""
        if self.power_source and not self.backend:
            return "--power-source applies only to the proxy that --backend starts"
        return ""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Display:
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

    def __enter__(self) -> Display:
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


def describe_error(exc: BaseException) -> str:
    """The first real error inside task groups' ExceptionGroups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def print_error(command: str, message: str) -> None:
    output_console(stderr=True).print(f"{command}: {message}", style="red", markup=False)


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


def connect(
    stack: ExitStack, options: BenchOptions, out_dir: Path, console: Console
) -> tuple[str, list[str]] | int:
    """The proxy to measure through (started on `stack` in front of `--backend` if given)
    and the models to run; or the exit code when that cannot be had."""
    proxy_url = (options.proxy or DEFAULT_PROXY).rstrip("/")
    backend, power_source = options.backend, options.power_source
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
        return proxy_url, resolve_models(proxy_url, options.models, options.api_key)
    except LaunchError as exc:
        print_error("energy-proxy bench", f"{exc} (log in {out_dir / 'proxy.log'})")
        return EXIT_FAILED
    except UsageError as exc:
        print_error("energy-proxy bench", str(exc))
        return EXIT_USAGE
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        print_error("energy-proxy bench", f"cannot list models at {proxy_url}: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        print_error("energy-proxy bench", "interrupted before any request")
        return EXIT_INTERRUPTED
