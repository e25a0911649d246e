"""`energy-proxy demo`: a real CPU backend, the proxy in front, a few prompts, one table."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from openai import APIError, OpenAI
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table

from backends.local.exit_status import describe_exit, exit_advice
from backends.local.launch import ChildServer, LaunchError, llama_cpp_python_server, proxy_server
from proxy.cli.output import output_console
from proxy.cli.signals import Terminated, terminated_on_signals

DEMO_PROMPTS: tuple[tuple[str, str, bool], ...] = (
    ("code", "Write a Python function that returns the reverse of a string.", False),
    ("sql", "Write an SQL query that counts the orders of each customer.", True),
    ("math", "What is 17 multiplied by 23? Show the steps.", False),
    ("translation", "Translate into French: The weather is lovely today.", True),
    (
        "summarization",
        "Summarize in one sentence: Solar panels turn sunlight into electricity. "
        "They work best in direct sun, need little maintenance and last for decades.",
        False,
    ),
    ("questions", "Why is the sky blue?", True),
)


@dataclass
class DemoRow:
    category: str
    mode: str
    energy: dict[str, Any]
    error: str = ""  # why this prompt failed ("" when it did not)


def run_demo(
    backend: str | None = None,
    model: str | None = None,
    port: int = 0,
    power_source: str = "auto",
    max_tokens: int = 48,
    keep: bool = False,
) -> int:
    console = output_console()
    # Its servers' logs and the request store: removed when the demo ends well, kept (and
    # named) when it fails, for the logs.
    logs = Path(tempfile.mkdtemp(prefix="energy-proxy-demo-"))
    code = _run(console, logs, backend, model, port, power_source, max_tokens, keep)
    if code in (0, 130) or code > 128:
        shutil.rmtree(logs, ignore_errors=True)
    return code


def _run(
    console: Console,
    logs: Path,
    backend: str | None,
    model: str | None,
    port: int,
    power_source: str,
    max_tokens: int,
    keep: bool,
) -> int:
    started: ChildServer | None = None  # the bundled backend, when the demo started it
    try:
        with terminated_on_signals(), ExitStack() as stack:
            if backend is None:
                console.print(
                    "[bold]Starting the bundled CPU backend[/] (llama-cpp-python, SmolLM2-135M)"
                )
                started = llama_cpp_python_server(log_path=logs / "backend.log")
                backend = stack.enter_context(started).url
            console.print(f"[bold]Starting energy-proxy[/] in front of {backend}")
            proxy = stack.enter_context(
                proxy_server(
                    backend,
                    port=port or None,
                    extra_args=["--power-source", power_source, "--db", str(logs / "requests.db")],
                    log_path=logs / "proxy.log",
                )
            )
            console.print(
                f"[bold]Live page:[/] {proxy.url}/  (open it to watch the prompts arrive)",
                highlight=False,
            )
            rows = _send_prompts(
                console, proxy.url, model, max_tokens, lambda: _died(started, wait_s=1.0)
            )
            death = _died(started)
            answered = any(r.energy for r in rows)
            if answered or not death:  # a table of failures says nothing a death does not
                _print_table(console, rows, proxy.url)
            if death or not answered:
                _fail(console, death or "every prompt failed")
                _quote_readyz(console, proxy.url)
                console.print(f"logs in {logs}", highlight=False)
                return 1
            if keep:
                return _keep_serving(console, proxy, started, logs)
    except LaunchError as exc:
        _fail(console, _died(started) or str(exc))
        console.print(f"logs in {logs}", highlight=False)
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; servers stopped[/]")
        return 130
    except Terminated as exc:
        # SIGTERM or SIGHUP, as Ctrl-C: the servers were stopped on the way out.
        console.print(f"[yellow]{exc}; servers stopped[/]")
        return 0 if keep else exc.exit_code
    return 0


def _keep_serving(
    console: Console, proxy: ChildServer, backend: ChildServer | None, logs: Path
) -> int:
    """`--keep`: the proxy (and the backend the demo started) stay up until Ctrl-C, for
    the live page and for your own requests; a server that dies ends it, saying why."""
    console.print(
        f"\n[bold]Still serving[/] at {proxy.url} (OpenAI base URL {proxy.url}/v1); "
        f"live page: {proxy.url}/ ; logs in {logs} (removed when it stops). "
        "Ctrl-C or SIGTERM to stop.",
        highlight=False,
        soft_wrap=True,
    )
    try:
        while True:
            time.sleep(0.5)
            death = _died(backend)
            if death:
                _fail(console, death)
                return 1
            if proxy.proc is not None and proxy.proc.poll() is not None:
                _fail(
                    console,
                    f"energy-proxy exited with {describe_exit(proxy.proc.returncode)} "
                    f"(its log: {logs / 'proxy.log'})",
                )
                return 1
    except KeyboardInterrupt:
        console.print("stopped")
        return 0


def _fail(console: Console, why: str) -> None:
    console.print(f"[red]energy-proxy demo: {escape(why)}[/]", soft_wrap=True, highlight=False)


def _died(server: ChildServer | None, wait_s: float = 0.0) -> str:
    """Why the backend the demo started is gone ("" while it runs, or when it was not
    started by the demo). `wait_s`: how long to give a dying process to finish exiting
    (its sockets close a moment before its exit status can be read)."""
    if server is None or server.proc is None:
        return ""
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.proc.wait(timeout=wait_s)
    if server.proc.poll() is None:
        return ""
    code = server.proc.returncode
    advice = exit_advice(code)
    return (
        f"the backend exited with {describe_exit(code)}"
        + (f": {advice}" if advice else "")
        + (f" (its log: {server.log_path})" if server.log_path else "")
    )


def _quote_readyz(console: Console, proxy_url: str) -> None:
    """What the proxy itself says of its backends (`/readyz`), for the user to see."""
    try:
        doc = httpx.get(proxy_url + "/readyz", timeout=5.0).json()
    except (httpx.HTTPError, ValueError) as exc:
        console.print(f"energy-proxy /readyz could not be read: {exc}", markup=False)
        return
    for b in doc.get("backends", []):
        if not b.get("ready"):
            console.print(
                f"energy-proxy /readyz: backend {b.get('name')} ({b.get('url')}) not ready: "
                f"{b.get('error', 'no error recorded')}",
                markup=False,
                soft_wrap=True,
            )


def _send_prompts(
    console: Console,
    proxy_url: str,
    model: str | None,
    max_tokens: int,
    backend_death: Callable[[], str],
) -> list[DemoRow]:
    with OpenAI(base_url=proxy_url + "/v1", api_key="demo", max_retries=0, timeout=300) as client:
        try:
            model = model or client.models.list().data[0].id
        except (APIError, IndexError) as exc:
            return [DemoRow("(models)", "-", {}, f"no model to ask: {exc or 'none listed'}")]
        return _ask_each(console, client, model, max_tokens, backend_death)


def _ask_each(
    console: Console,
    client: OpenAI,
    model: str,
    max_tokens: int,
    backend_death: Callable[[], str],
) -> list[DemoRow]:
    rows: list[DemoRow] = []
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("sending prompts", total=len(DEMO_PROMPTS))
        for category, prompt, stream in DEMO_PROMPTS:
            progress.update(task, description=f"{category} ({'stream' if stream else 'json'})")
            kwargs: dict[str, Any] = {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "extra_headers": {"x-prompt-category": category},
            }
            try:
                rows.append(_ask(client, category, stream, kwargs))
            except APIError as exc:
                # One failed prompt (a backend that broke off, say) is one failed row;
                # a backend that died fails every prompt after it, so stop asking.
                rows.append(DemoRow(category, "stream" if stream else "json", {}, str(exc)))
                if backend_death():
                    break
            progress.advance(task)
    return rows


def _ask(client: OpenAI, category: str, stream: bool, kwargs: dict[str, Any]) -> DemoRow:
    if not stream:
        resp = client.chat.completions.create(**kwargs)
        return DemoRow(category, "json", (resp.model_extra or {})["energy"])
    energy: dict[str, Any] = {}
    try:
        with client.chat.completions.create(stream=True, **kwargs) as events:
            for chunk in events:
                extra = chunk.model_extra or {}
                if "energy" in extra:
                    energy = extra["energy"]
    except APIError as exc:
        # A stream the backend broke off: the proxy sends its energy before the error
        # event, so the row keeps what the answer so far cost beside why it failed.
        if not energy:
            raise
        return DemoRow(category, "stream", energy, f"broken off: {exc}")
    return DemoRow(category, "stream", energy, "" if energy else "no energy event in the stream")


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def _print_table(console: Console, rows: list[DemoRow], proxy_url: str) -> None:
    methods = sorted({r.energy["method"] for r in rows if r.energy})
    table = Table(title="Energy per prompt, measured by energy-proxy")
    for col in ("category", "mode", "tokens in/out", "joules", "J/token", "gCO2eq", "seconds"):
        left = col in ("category", "mode")
        table.add_column(col, justify="left" if left else "right", no_wrap=True)
    for r in rows:
        e = r.energy
        if not e:
            table.add_row(r.category, r.mode, f"[red]failed: {r.error[:60]}[/]", *["-"] * 4)
            continue
        prompt = e.get("prompt_tokens")
        table.add_row(
            r.category,
            f"{r.mode} [red](cut)[/]" if r.error else r.mode,
            f"{'?' if prompt is None else prompt}/{e.get('completion_tokens')}",
            _fmt(e.get("joules")),
            _fmt(e.get("joules_per_token")),
            _fmt(e.get("co2eq_g")),
            _fmt(e.get("duration_s")),
        )
    console.print(table)
    intensity = next((r.energy for r in rows if r.energy), {})
    console.print(
        f"method: {', '.join(methods)}; grid intensity "
        f"{intensity.get('carbon_intensity_g_per_kwh')} gCO2eq/kWh "
        f"({intensity.get('carbon_intensity_source')})"
    )
    if any("estimate" in m for m in methods):
        console.print(
            "[yellow]cpu-estimate: no power sensor is readable here, so these joules are an "
            "ESTIMATE from CPU utilisation (see README), not a measurement.[/]"
        )
    if any(r.energy and r.energy.get("prompt_tokens") is None for r in rows):
        console.print(
            "'?' prompt tokens: the backend sent no usage in its stream and has no tokenize "
            "endpoint; the proxy counted the completion tokens itself (tokens_source=proxy)."
        )
    for r in rows:
        if r.energy and r.error:
            console.print(
                f"{r.category} (cut): {escape(r.error)}; its joules are what the answer cost "
                "until then",
                soft_wrap=True,
                highlight=False,
            )
    console.print(f"metrics were at {proxy_url}/metrics while the demo ran")


if __name__ == "__main__":
    sys.exit(run_demo())
