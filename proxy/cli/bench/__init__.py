"""`energy-proxy bench`: a prompt set through the proxy, measured per request.

`runner.run_bench` sends and measures (async, no files); `results` aggregates (pure);
`files`, `table` and `report_html` write and show; `command` is the command line's part.
"""

from __future__ import annotations

from proxy.cli.bench.results import RequestResult, build_summary, summarize
from proxy.cli.bench.runner import (
    BenchRun,
    Hooks,
    Job,
    ModelRun,
    Phase,
    PromptLike,
    RunOptions,
    run_bench,
    run_jobs,
    send_one,
)

__all__ = [
    "BenchRun",
    "Hooks",
    "Job",
    "ModelRun",
    "Phase",
    "PromptLike",
    "RequestResult",
    "RunOptions",
    "build_summary",
    "run_bench",
    "run_jobs",
    "send_one",
    "summarize",
]
