"""`energy-proxy bench` through its command line: flags, exit codes, the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.cli.main import main
from tests.conftest import serve_proxy
from tests.support.fakes.openai_backend import FakeState, make_fake_backend
from tests.support.servers import ServerThread

QUICK = ["--repetitions", "1", "--warmup", "0", "--idle-s", "0", "--pause-s", "0"]


@pytest.fixture
def proxy_url(tmp_path: Path) -> Iterator[str]:
    backend_app, _ = make_fake_backend(FakeState(models=["fake-model", "fake-b"]))
    with ServerThread(backend_app) as backend_url, serve_proxy(tmp_path, backend_url) as url:
        yield url


@pytest.fixture
def prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    lines = [
        {"id": f"{c}-{i}", "category": c, "messages": [{"role": "user", "content": f"{c} {i}"}],
         "max_tokens": 3}
        for c in ("code", "math", "questions")
        for i in range(3)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_bench_command_writes_everything(
    proxy_url: str,
    prompt_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "150")
    out = tmp_path / "out"
    argv = ["bench", "--proxy", proxy_url, "--prompts", str(prompt_file), "--per-category", "2"]
    code = main([*argv, *QUICK, "--max-tokens", "2", "--out", str(out)])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {
        "requests.jsonl",
        "requests.csv",
        "summary.json",
        "report.html",
    }
    doc = json.loads((out / "summary.json").read_text())
    assert doc["config"]["models"] == ["fake-model", "fake-b"]  # all the proxy lists
    assert doc["config"]["prompt_count"] == 6
    # What it was measured on, from the proxy's /readyz, in the summary and the report.
    assert doc["config"]["hardware"] == "constant (constant)"
    assert "<dt>hardware</dt><dd>constant (constant)</dd>" in (out / "report.html").read_text()
    assert [(r["model"], r["category"], r["count"]) for r in doc["rows"]] == [
        (m, c, 2) for m in ("fake-model", "fake-b") for c in ("code", "math", "questions")
    ]
    assert all(r["mean_completion_tokens"] == 2 for r in doc["rows"])  # --max-tokens
    printed = capsys.readouterr().out
    assert "J/req" in printed and "│ fake-b" in printed and "results in" in printed


def test_models_flag_picks_models(proxy_url: str, prompt_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["bench", "--proxy", proxy_url, "--prompts", str(prompt_file), "--models", "fake-b"]
    assert main([*argv, *QUICK, "--out", str(out)]) == 0
    doc = json.loads((out / "summary.json").read_text())
    assert {r["model"] for r in doc["rows"]} == {"fake-b"}


@pytest.mark.parametrize(
    "bad",
    [
        ["--repetitions", "0"],
        ["--concurrency", "x"],
        ["--idle-s", "-1"],
        ["--proxy", "http://a", "--backend", "http://b"],
        ["--per-category", "0"],
    ],
)
def test_bad_arguments_exit_2(bad: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", *bad])
    assert exc.value.code == 2


def test_unknown_model_and_bad_prompts_exit_2(
    proxy_url: str, prompt_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["bench", "--proxy", proxy_url, *QUICK, "--out", str(tmp_path / "o")]
    assert main([*base, "--prompts", str(prompt_file), "--models", "nope"]) == 2
    assert "unknown model(s) nope; the proxy lists: fake-model, fake-b" in capsys.readouterr().err
    assert main([*base, "--prompts", str(tmp_path / "missing.jsonl")]) == 2
    assert main([*base, "--prompts", "builtin:v0"]) == 2
    assert not (tmp_path / "o").exists()


def test_unreachable_proxy_exits_1(prompt_file: Path, tmp_path: Path) -> None:
    argv = ["bench", "--proxy", "http://127.0.0.1:9", "--prompts", str(prompt_file), *QUICK]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 1


def test_rows_with_enough_requests_get_stars(
    proxy_url: str, prompt_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    argv = ["bench", "--proxy", proxy_url, "--prompts", str(prompt_file), "--models", "fake-b"]
    quick = ["--warmup", "0", "--idle-s", "0", "--pause-s", "0", "--max-tokens", "1"]
    assert main([*argv, *quick, "--repetitions", "7", "--out", str(out)]) == 0
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [r["count"] for r in rows] == [21, 21, 21]  # MIN_REQUESTS_FOR_RATING is 20
    for r in rows:
        assert r["stars"] == 5  # one model per category: nothing uses less
        assert r["wh_per_1000_queries"] == pytest.approx(r["mean_joules"] / 3.6)


def test_the_table_comes_out_whole_through_a_pipe(
    proxy_url: str, prompt_file: Path, tmp_path: Path
) -> None:
    """No terminal (a pipe, `| tee`, a CI log) and no COLUMNS: the names are not folded,
    no column is cut, and the rating note is one line."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    argv = ["bench", "--proxy", proxy_url, "--prompts", str(prompt_file), "--per-category", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", *argv, *QUICK, "--max-tokens", "2",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    header = next(line for line in lines if "category" in line and "J/req" in line)
    assert "±sd J" in header and "TTFT90 s" in header  # the wide columns, not dropped
    for model in ("fake-model", "fake-b"):
        for category in ("code", "math", "questions"):
            assert any(f"│ {model} " in ln and f"│ {category} " in ln for ln in lines), done.stdout
    note = next(line for line in lines if line.startswith("stars: none yet"))
    assert note.endswith("(raise --repetitions or --per-category).")
    assert "at most 2" in note
