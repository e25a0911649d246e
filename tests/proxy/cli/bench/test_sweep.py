"""`energy-proxy bench --sweep` against the proxy in front of the fake backend, on real
sockets; GPU power limits through a fake `PowerLimits` (NVML itself: tests/metering)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from rich.console import Console

from backends.local.launch import llama_cpp_python_server
from proxy.cli.bench import sweep as sweep_run
from proxy.cli.bench import sweep_plan as sweep
from proxy.cli.bench.common import BenchOptions
from proxy.cli.bench.pareto import MeasuredSetting, advise, pareto_front
from proxy.cli.bench.power_limit import PowerLimitError, PowerLimitPermissionError
from proxy.cli.bench.results import STATUS_OK, RequestResult
from proxy.cli.bench.sweep import run_sweep_command
from proxy.cli.bench.sweep_plan import (
    NO_NVML,
    SettingRun,
    SweepSetting,
    compare_outputs,
    concurrency_levels,
    plan_settings,
)
from proxy.cli.main import main
from tests.conftest import serve_proxy
from tests.support.fakes.openai_backend import FakeState, make_fake_backend
from tests.support.servers import ServerThread

QUICK: dict[str, Any] = {
    "repetitions": 1,
    "warmup": 0,
    "idle_s": 0.0,
    "pause_s": 0.0,
    "max_tokens": 3,
}


@pytest.fixture
def fake_state() -> FakeState:
    return FakeState(models=["fake-model"])


@pytest.fixture
def proxy_url(tmp_path: Path, fake_state: FakeState) -> Iterator[str]:
    backend_app, _ = make_fake_backend(fake_state)
    with ServerThread(backend_app) as backend_url, serve_proxy(tmp_path, backend_url) as url:
        yield url


@pytest.fixture
def prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    lines = [
        {"id": f"{c}-{i}", "category": c, "messages": [{"role": "user", "content": f"{c} {i}"}],
         "max_tokens": 3, "temperature": 0}
        for c in ("code", "math")
        for i in range(2)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture(autouse=True)
def _levels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sweep.CONCURRENCY_ENV, "1,2,4")


def no_nvml() -> sweep.PowerLimitsLike:
    raise PowerLimitError("cannot reach NVML for power limits: test")


class FakeLimits:
    """Records every limit applied and checks it is restored, however the block ends."""

    def __init__(
        self, points_w: list[float], current_w: float = 300.0, refuse: bool = False
    ) -> None:
        self.points_w = points_w
        self.original_w = current_w
        self.limit_w = current_w
        self.applied_w: list[float] = []
        self.restores: list[str] = []  # how each block ended
        self.refuse = refuse

    def sweep_points_w(self, steps: int) -> list[float]:
        return self.points_w[:steps]

    def current_w(self) -> dict[int, float]:
        return {0: self.limit_w}

    def applied(self, limit_w: float) -> FakeLimits._Applied:
        return FakeLimits._Applied(self, limit_w)

    class _Applied:
        def __init__(self, owner: FakeLimits, limit_w: float) -> None:
            self.owner, self.limit_w = owner, limit_w

        def __enter__(self) -> None:
            if self.owner.refuse:
                raise PowerLimitPermissionError("setting power limits needs root")
            assert self.owner.limit_w == self.owner.original_w, "nested or not restored"
            self.owner.applied_w.append(self.limit_w)
            self.owner.limit_w = self.limit_w

        def __exit__(
            self,
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
        ) -> None:
            self.owner.limit_w = self.owner.original_w
            self.owner.restores.append(exc_type.__name__ if exc_type else "ok")


def run(proxy_url: str, prompt_file: Path, out: Path, **kw: Any) -> tuple[int, dict[str, Any], str]:
    buf = io.StringIO()
    kw.setdefault("power_limits", no_nvml)
    args: dict[str, Any] = {**QUICK, **kw}
    hooks = {k: args.pop(k) for k in ("power_limits", "on_setting", "sleep") if k in args}
    code = run_sweep_command(
        BenchOptions(proxy=proxy_url, prompts=str(prompt_file), out=str(out), **args),
        Console(file=buf, width=160, color_system=None),
        **hooks,
    )
    doc = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").exists() else {}
    return code, doc, buf.getvalue()


def points_of(model_doc: dict[str, Any]) -> list[MeasuredSetting]:
    return [
        MeasuredSetting(
            s["label"], s["energy_j_per_token"], s["p90_ttft_s"], s["mean_tpot_s"],
            {"concurrency": s["concurrency"], "power_limit_w": s["power_limit_w"]},
        )
        for s in model_doc["settings"]
        if s["energy_j_per_token"] is not None
    ]  # fmt: skip


def test_sweep_writes_settings_front_and_advice(
    proxy_url: str, prompt_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code, doc, printed = run(proxy_url, prompt_file, out)
    assert code == 0
    assert doc["status"] == "complete"
    assert doc["power_limit"] == {
        "swept": False,
        "reason": NO_NVML,
        "current_w": None,
        "points_w": [],
    }
    (m,) = doc["models"]
    assert m["model"] == "fake-model" and m["baseline"] == "concurrency 1"
    assert [s["label"] for s in m["settings"]] == [f"concurrency {c}" for c in (1, 2, 4)]
    for s in m["settings"]:
        assert s["status"] == "measured" and s["requests"] == 4 and s["failures"] == 0
        assert s["completion_tokens"] == 12 and s["energy_j_per_token"] > 0
        assert s["energy_j_per_token"] == pytest.approx(s["joules"] / 12)
    # the same numbers through proxy.cli.bench.pareto give the same front and the same advice
    points = points_of(m)
    assert len(points) == 3
    assert m["front"] == [p.label for p in pareto_front(points)] and m["front"]
    assert [s["label"] for s in m["settings"] if s["on_front"]] == sorted(
        m["front"], key=[s["label"] for s in m["settings"]].index
    )
    advice = advise(points, points[0], None, None)
    if m["recommendation"] is None:
        assert m["no_recommendation_reason"] == advice.message()
        assert f"no recommendation for fake-model: {advice.message()}" in printed
    else:
        assert m["recommendation"]["message"] == advice.message()
        assert "less energy than now" in printed
    assert m["outputs"] == {
        "identical": True,
        "compared_settings": ["concurrency 1", "concurrency 2", "concurrency 4"],
        "compared_prompts": 4,
        "differing_prompt_ids": [],
        "not_compared_prompt_ids": [],
    }
    assert f"power limit: not swept ({NO_NVML})" in printed
    assert "outputs at temperature 0: identical across 3 setting(s)" in printed
    assert "concurrency 1 (now)" in printed and "J/token" in printed
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12
    assert {(r["setting"], r["concurrency"]) for r in rows} == {
        (f"concurrency {c}", str(c)) for c in (1, 2, 4)
    }


def test_outputs_that_change_with_the_setting_are_reported(
    proxy_url: str, prompt_file: Path, tmp_path: Path, fake_state: FakeState
) -> None:
    def change_answers(model: str, setting: SweepSetting) -> None:
        if setting.concurrency == 4:
            fake_state.tokens = ("Something", " else")

    code, doc, printed = run(proxy_url, prompt_file, tmp_path / "o", on_setting=change_answers)
    assert code == 0
    outputs = doc["models"][0]["outputs"]
    assert outputs["identical"] is False
    assert outputs["differing_prompt_ids"] == ["code-0", "code-1", "math-0", "math-1"]
    assert "NOT identical" in printed and "code-0, code-1, math-0, math-1" in printed


def test_a_setting_with_failures_is_never_recommended(
    proxy_url: str, prompt_file: Path, tmp_path: Path, fake_state: FakeState
) -> None:
    def break_streams(model: str, setting: SweepSetting) -> None:
        fake_state.die_after = 1 if setting.concurrency == 2 else None

    code, doc, _ = run(proxy_url, prompt_file, tmp_path / "o", on_setting=break_streams)
    assert code == 0
    m = doc["models"][0]
    broken = m["settings"][1]
    assert broken["label"] == "concurrency 2" and broken["failures"] == 4
    assert broken["status"] == "4 failed: not compared" and not broken["on_front"]
    assert "concurrency 2" not in m["front"]
    assert (m["recommendation"] or {}).get("label") != "concurrency 2"
    candidates = [p for p in points_of(m) if p.label != "concurrency 2"]
    assert m["front"] == [p.label for p in pareto_front(candidates)]


def test_compare_outputs_skips_failures_and_non_greedy_prompts() -> None:
    def r(pid: str, sha: str, rep: int = 0, ok: bool = True) -> RequestResult:
        status = STATUS_OK if ok else "error"
        return RequestResult("m", "c", pid, rep, status, output_sha256=sha)

    a = SettingRun(SweepSetting(1), [r("p", "x"), r("q", "y"), r("t", "z"), r("p", "other", 1)])
    b = SettingRun(SweepSetting(2), [r("p", "x"), r("q", "y2", ok=False), r("t", "zz")])
    result = compare_outputs([a, b], {"p", "q"})  # "t" is not at temperature 0
    assert result["identical"] is True  # repetition 1 and the failed request do not count
    assert result["not_compared_prompt_ids"] == ["q"]
    c = SettingRun(SweepSetting(4), [r("p", "different")])
    assert compare_outputs([a, b, c], {"p", "q"})["differing_prompt_ids"] == ["p"]


def test_a_latency_target_nothing_meets_gives_no_recommendation(
    proxy_url: str, prompt_file: Path, tmp_path: Path
) -> None:
    code, doc, printed = run(proxy_url, prompt_file, tmp_path / "o", slo_ttft_ms=1e-6)
    assert code == 0
    m = doc["models"][0]
    assert m["recommendation"] is None
    assert m["front"]
    reason = m["no_recommendation_reason"]
    assert reason.startswith("no measured setting meets the latency targets (p90 TTFT <= 1e-09 s")
    assert reason == advise(points_of(m), points_of(m)[0], 1e-9, None).message()
    assert f"no recommendation for fake-model: {reason}" in " ".join(printed.split())


def test_power_limits_are_swept_and_restored(
    proxy_url: str, prompt_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(sweep.POWER_STEPS_ENV, "3")
    limits = FakeLimits([300.0, 250.0, 200.0, 150.0])
    seen: list[tuple[SweepSetting, float]] = []
    code, doc, printed = run(
        proxy_url,
        prompt_file,
        tmp_path / "o",
        power_limits=lambda: limits,
        on_setting=lambda _m, s: seen.append((s, limits.limit_w)),
    )
    assert code == 0
    # 300 W is the current limit: measured by the concurrency settings, not set again
    assert limits.applied_w == [250.0, 200.0] and limits.restores == ["ok", "ok"]
    assert limits.limit_w == 300.0
    for setting, limit_w in seen:  # each setting ran under its own limit
        assert limit_w == (setting.power_limit_w or 300.0)
    assert doc["power_limit"] == {
        "swept": True,
        "reason": None,
        "current_w": {"0": 300.0},
        "points_w": [250.0, 200.0],
    }
    labels = [s["label"] for s in doc["models"][0]["settings"]]
    assert labels == [
        "concurrency 1", "concurrency 2", "concurrency 4",
        "concurrency 1, 250 W", "concurrency 4, 250 W",
        "concurrency 1, 200 W", "concurrency 4, 200 W",
    ]  # fmt: skip
    assert "power limit: swept 250 W, 200 W (restored afterwards)" in printed


@pytest.mark.parametrize(
    ("error", "code", "status", "restore"),
    [
        (KeyboardInterrupt, 130, "interrupted, partial", "KeyboardInterrupt"),
        (RuntimeError, 1, "aborted, partial: RuntimeError: boom", "RuntimeError"),
    ],
)
def test_power_limit_restored_on_ctrl_c_and_errors(
    proxy_url: str,
    prompt_file: Path,
    tmp_path: Path,
    error: type[BaseException],
    code: int,
    status: str,
    restore: str,
) -> None:
    limits = FakeLimits([300.0, 200.0])

    def stop(model: str, setting: SweepSetting) -> None:
        if setting.power_limit_w == 200.0 and setting.concurrency == 4:
            raise error("boom")

    got, doc, printed = run(
        proxy_url, prompt_file, tmp_path / "o", power_limits=lambda: limits, on_setting=stop
    )
    assert got == code
    assert limits.applied_w == [200.0] and limits.restores == [restore]
    assert limits.limit_w == 300.0
    assert doc["status"] == status
    settings = {s["label"]: s for s in doc["models"][0]["settings"]}
    assert settings["concurrency 1, 200 W"]["status"] == "measured"
    assert settings["concurrency 4, 200 W"]["requests"] == 0
    assert settings["concurrency 4, 200 W"]["status"] == "not run"
    assert status in printed


def test_power_limits_without_root_are_skipped(
    proxy_url: str, prompt_file: Path, tmp_path: Path
) -> None:
    limits = FakeLimits([300.0, 200.0], refuse=True)
    code, doc, printed = run(proxy_url, prompt_file, tmp_path / "o", power_limits=lambda: limits)
    assert code == 0 and limits.applied_w == []
    assert doc["power_limit"]["swept"] is False
    assert doc["power_limit"]["reason"].startswith("needs root")
    skipped = [s for s in doc["models"][0]["settings"] if s["power_limit_w"] is not None]
    assert len(skipped) == 2 and all(s["status"].startswith("skipped: needs root") for s in skipped)
    assert "power limit: not swept (needs root" in printed


def test_through_the_command_line(
    proxy_url: str,
    prompt_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(sweep.CONCURRENCY_ENV, "1,2")
    monkeypatch.setenv("COLUMNS", "160")
    monkeypatch.setattr(sweep_run, "nvml_power_limits", no_nvml)  # never touch a real GPU
    out = tmp_path / "out"
    argv = ["bench", "--sweep", "--proxy", proxy_url, "--prompts", str(prompt_file)]
    quick = ["--repetitions", "1", "--warmup", "0", "--idle-s", "0", "--pause-s", "0"]
    assert main([*argv, *quick, "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"sweep.json", "sweep.csv"}
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["config"]["concurrency_levels"] == [1, 2]
    assert "results in" in capsys.readouterr().out


def test_concurrency_levels_and_plan() -> None:
    assert concurrency_levels(None, 1) == [1, 2, 4, 8]
    assert concurrency_levels("4, 2", 3) == [2, 3, 4]
    for bad in ("0,1", "a"):
        with pytest.raises(ValueError, match=sweep.CONCURRENCY_ENV):
            concurrency_levels(bad, 1)
    assert plan_settings([1, 2], 1, [200.0]) == [
        SweepSetting(1),
        SweepSetting(2),
        SweepSetting(1, 200.0),
        SweepSetting(2, 200.0),
    ]


@pytest.mark.e2e
def test_sweep_against_the_bundled_backend(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    with llama_cpp_python_server(log_path=tmp_path / "backend.log") as backend:
        done = subprocess.run(
            [
                sys.executable, "-m", "proxy.cli", "bench", "--sweep", "--backend", backend.url,
                "--per-category", "1", "--repetitions", "1", "--warmup", "0",
                "--idle-s", "0", "--pause-s", "0", "--max-tokens", "16", "--out", str(out),
            ],
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "COLUMNS": "160", "NO_COLOR": "1",
                 sweep.CONCURRENCY_ENV: "1,2"},
        )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    print(done.stdout)
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["status"] == "complete"
    (m,) = doc["models"]
    assert [s["concurrency"] for s in m["settings"]][:2] == [1, 2]
    # llama-cpp-python's server may break off a stream when another request arrives: a
    # setting with failures is shown but never on the front nor recommended
    assert m["settings"][0]["failures"] == 0 and m["front"]
    for s in m["settings"]:
        assert not (s["failures"] and s["on_front"])
    printed = " ".join(done.stdout.split())
    if m["recommendation"] is not None:
        assert "less energy than now" in printed
    else:
        assert " ".join(m["no_recommendation_reason"].split()) in printed
