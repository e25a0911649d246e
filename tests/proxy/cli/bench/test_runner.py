"""The runner and the output directory against the proxy (real sockets, aiohttp upstream)
in front of the fake OpenAI backend, with a constant 100 W power source."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from proxy.cli.bench.command import bench_to_dir
from proxy.cli.bench.files import read_csv, read_jsonl
from proxy.cli.bench.results import STATUS_PARTIAL, RequestResult, summarize
from proxy.cli.bench.runner import Hooks, Job, Phase, RunOptions, run_bench
from tests.conftest import serve_proxy
from tests.support.bench_results import Prompt, prompts
from tests.support.fakes.openai_backend import FakeState, make_fake_backend
from tests.support.servers import ServerThread

FAST = RunOptions(repetitions=2, warmup=1, idle_s=0, pause_s=0)
# The fake answers max_tokens tokens cycling through "Hello", ",", " energy", " world", "!".
FOUR_TOKENS = hashlib.sha256(b"Hello, energy world").hexdigest()


@pytest.fixture
def state() -> FakeState:
    return FakeState(models=["fake-model", "fake-b"])


@pytest.fixture
def proxy_url(state: FakeState, tmp_path: Path) -> Iterator[str]:
    backend_app, _ = make_fake_backend(state)
    with ServerThread(backend_app) as backend_url, serve_proxy(tmp_path, backend_url) as url:
        yield url


def console() -> Console:
    return Console(record=True, width=200, color_system=None)


def test_every_request_measured_and_written(
    proxy_url: str, state: FakeState, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    c = console()
    opts = RunOptions(repetitions=2, warmup=1, idle_s=0.2, idle_sample_every_s=0.05, pause_s=0)
    outcome = bench_to_dir(
        proxy_url, ["fake-model"], prompts(), opts, out, console=c, config={"x": 1}
    )
    assert outcome.exit_code == 0
    results = read_jsonl(out / "requests.jsonl")
    assert len(results) == 2 * 4  # repetitions x prompts; the warm-up is not among them
    assert read_csv(out / "requests.csv") == results
    assert len(state.requests) == 1 + 8
    for r in results:
        assert r.ok, r.error
        assert r.joules is not None and r.joules > 0
        assert r.method == "constant"
        assert r.completion_tokens == 4 and r.prompt_tokens == 4
        assert r.ttft_s is not None and r.tpot_s is not None and r.duration_s is not None
        assert 0 <= r.ttft_s <= r.duration_s
        assert r.co2eq_g == pytest.approx(r.joules / 3.6e6 * 500.0)
        assert r.output_sha256 == FOUR_TOKENS
        assert uuid.UUID(r.request_id) and r.http_status == 200
    assert sorted((r.prompt_id, r.repetition) for r in results) == sorted(
        (p.id, rep) for p in prompts() for rep in range(2)
    )
    sent = state.requests[-1]
    assert sent["body"]["stream"] is True and sent["body"]["seed"] == 42
    assert sent["body"]["max_tokens"] == 4 and sent["body"]["temperature"] == 0.0
    assert sent["headers"]["x-prompt-category"] in ("code", "math")

    doc = json.loads((out / "summary.json").read_text())
    assert doc["status"] == "complete" and doc["config"] == {"x": 1}
    assert doc["rows"] == json.loads(json.dumps(summarize(results, models=["fake-model"])))
    assert [(r["category"], r["count"], r["failures"]) for r in doc["rows"]] == [
        ("code", 4, 0),
        ("math", 4, 0),
    ]
    (model_run,) = doc["models"]
    assert model_run["idle_watts"] == 100.0  # the constant source, read from /metrics
    assert model_run["idle_samples"] >= 2 and model_run["idle_max_inflight"] == 0
    assert model_run["warmup_requests"] == 1 and model_run["warmup_failures"] == 0
    assert model_run["requests"] == 8 and model_run["completion_tokens"] == 32
    assert (out / "report.html").read_text().count('class="bar"') == 2
    text = c.export_text()
    assert "│ fake-model │ code" in text and "results in" in text


def test_failures_are_counted_per_model_and_category(proxy_url: str, tmp_path: Path) -> None:
    def headers(job: Job) -> dict[str, str]:
        # the math prompts fail in the first repetition only
        if job.prompt.category == "math" and job.repetition == 0 and not job.warmup:
            return {"x-fake-error": "500"}
        return {}

    ps = [*prompts(), Prompt("poem-0", "poetry")]  # not a configured category: 400
    out = tmp_path / "out"
    outcome = bench_to_dir(
        proxy_url, ["fake-model"], ps, FAST, out, console=console(), request_headers=headers
    )
    assert outcome.exit_code == 0  # failures are results, not a failed run
    results = read_jsonl(out / "requests.jsonl")
    assert len(results) == 2 * 5
    rows = {r["category"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert (rows["code"]["count"], rows["code"]["failures"]) == (4, 0)
    assert (rows["math"]["count"], rows["math"]["failures"]) == (2, 2)
    assert (rows["poetry"]["count"], rows["poetry"]["failures"]) == (0, 2)
    assert rows["poetry"]["mean_joules"] is None
    bad = [r for r in results if not r.ok]
    assert {(r.category, r.http_status) for r in bad} == {("math", 500), ("poetry", 400)}
    assert all("fake backend error" in r.error for r in bad if r.category == "math")
    assert all("poetry" in r.error for r in bad if r.category == "poetry")
    reasons = outcome.summary["failure_reasons"]
    assert sum(r["count"] for r in reasons) == 4
    assert len([r for r in read_csv(out / "requests.csv") if r.status == "error"]) == 4


@pytest.mark.parametrize("how", ["raise", "sigint"])
def test_ctrl_c_leaves_valid_partial_files(proxy_url: str, tmp_path: Path, how: str) -> None:
    seen: list[RequestResult] = []

    def interrupt_after_three(r: RequestResult) -> None:
        seen.append(r)
        if len(seen) == 3:
            if how == "sigint":  # a real Ctrl-C, through asyncio.run's own handler
                signal.raise_signal(signal.SIGINT)
            else:
                raise KeyboardInterrupt

    out = tmp_path / "out"
    outcome = bench_to_dir(
        proxy_url,
        ["fake-model", "fake-b"],
        prompts(),
        FAST,
        out,
        console=console(),
        on_result=interrupt_after_three,
    )
    assert outcome.exit_code == 130
    assert len(seen) == 3  # nothing ran after the interrupt
    results = read_jsonl(out / "requests.jsonl")
    assert results == seen == read_csv(out / "requests.csv")
    doc = json.loads((out / "summary.json").read_text())
    assert doc["status"] == STATUS_PARTIAL and doc["interrupted"] is True
    assert sum(r["count"] + r["failures"] for r in doc["rows"]) == 3
    assert doc["models"] == []  # no model finished its pass
    assert "interrupted, partial" in (out / "report.html").read_text()
    # The proxy has nothing of ours left in flight.
    metrics = httpx.get(f"{proxy_url}/metrics").text
    assert "energy_proxy_inflight_requests" not in metrics or all(
        ln.endswith(" 0.0")
        for ln in metrics.splitlines()
        if ln.startswith("energy_proxy_inflight_requests{")
    )


def test_concurrency_sends_everything_once(proxy_url: str, state: FakeState) -> None:
    opts = RunOptions(repetitions=3, warmup=0, concurrency=3, idle_s=0, pause_s=0)
    run = asyncio.run(run_bench(proxy_url, ["fake-model"], prompts(per=3), opts))
    assert len(run.results) == 18 and all(r.ok for r in run.results)
    assert {r.concurrency for r in run.results} == {3}
    assert sorted((r.prompt_id, r.repetition) for r in run.results) == sorted(
        (p.id, rep) for p in prompts(per=3) for rep in range(3)
    )
    assert len(state.requests) == 18


async def test_pause_between_models_and_idle_baseline_per_model(proxy_url: str) -> None:
    now = [0.0]
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    phases: list[Phase] = []
    opts = RunOptions(repetitions=1, warmup=2, idle_s=1.0, idle_sample_every_s=0.5, pause_s=7.0)
    run = await run_bench(
        proxy_url,
        ["fake-model", "fake-b"],
        prompts(per=1),
        opts,
        Hooks(on_phase=phases.append),
        sleep=sleep,
        clock=lambda: now[0],
    )
    assert [(p.model, p.name) for p in phases] == [
        ("fake-model", "idle"),
        ("fake-model", "warmup"),
        ("fake-model", "measure"),
        ("fake-b", "pause"),
        ("fake-b", "idle"),
        ("fake-b", "warmup"),
        ("fake-b", "measure"),
    ]
    assert slept == [0.5, 0.5, 7.0, 0.5, 0.5]  # no pause before the first model
    assert [m.idle_samples for m in run.models] == [3, 3]
    assert [m.idle_watts for m in run.models] == [100.0, 100.0]
    assert [m.warmup_requests for m in run.models] == [2, 2]
    assert {r.model for r in run.results} == {"fake-model", "fake-b"}
    assert len(run.results) == 4


async def test_a_stream_that_breaks_is_a_failure_with_its_energy(proxy_url: str) -> None:
    opts = RunOptions(repetitions=1, warmup=0, idle_s=0, pause_s=0)
    run = await run_bench(
        proxy_url,
        ["fake-model"],
        [Prompt("code-0", "code")],
        opts,
        Hooks(request_headers=lambda job: {"x-fake-die-after": "2"}),
    )
    (r,) = run.results
    assert not r.ok and r.http_status == 200
    assert "stream error" in r.error
    assert r.joules is not None and r.joules > 0  # measured, kept, not in the means
    assert summarize(run.results)[0]["failures"] == 1


async def test_unreachable_proxy_is_a_failed_request_not_a_crash() -> None:
    opts = RunOptions(repetitions=1, warmup=0, idle_s=0, pause_s=0, timeout_s=5)
    run = await run_bench("http://127.0.0.1:9", ["m"], [Prompt("q", "questions")], opts)
    (r,) = run.results
    assert not r.ok and r.http_status is None and "ConnectError" in r.error


def test_an_unexpected_error_keeps_what_finished(proxy_url: str, tmp_path: Path) -> None:
    calls = []

    def headers(job: Job) -> dict[str, str]:
        calls.append(job)
        if len(calls) == 3:
            raise RuntimeError("a bug in a hook")
        return {}

    out = tmp_path / "out"
    outcome = bench_to_dir(
        proxy_url, ["fake-model"], prompts(), FAST, out, console=console(), request_headers=headers
    )
    assert outcome.exit_code == 1
    doc = json.loads((out / "summary.json").read_text())
    assert doc["status"] == "aborted, partial"
    assert doc["aborted"] == "RuntimeError: a bug in a hook"
    assert len(read_jsonl(out / "requests.jsonl")) == 1  # the warm-up was call 1
    assert "aborted, partial" in (out / "report.html").read_text()
