"""`energy-proxy bench --backend URL` as a user runs it, on the real CPU backend
(llama-cpp-python with SmolLM2-135M): it starts the proxy, measures, writes the files,
prints the table, and stops the proxy. Run alone with `pytest -m e2e`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backends.local.launch import BUNDLED_MODEL_ALIAS, llama_cpp_python_server
from metering.ratings.score import rate
from proxy.cli.bench.files import read_csv, read_jsonl
from proxy.cli.bench.results import summarize

pytestmark = pytest.mark.e2e

CATEGORIES = ("code", "sql", "math", "translation", "summarization", "questions")


def test_bench_against_the_bundled_backend(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    with llama_cpp_python_server(log_path=tmp_path / "backend.log") as backend:
        done = subprocess.run(
            [
                sys.executable, "-m", "proxy.cli", "bench", "--backend", backend.url,
                "--per-category", "1", "--repetitions", "1", "--warmup", "1",
                "--idle-s", "1", "--pause-s", "0", "--max-tokens", "32", "--out", str(out),
            ],
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "COLUMNS": "150", "NO_COLOR": "1"},
        )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    results = read_jsonl(out / "requests.jsonl")
    assert read_csv(out / "requests.csv") == results
    assert sorted(r.category for r in results) == sorted(CATEGORIES)
    for r in results:
        assert r.ok, r.error
        assert r.model == BUNDLED_MODEL_ALIAS
        assert r.joules is not None and r.joules > 0
        assert r.completion_tokens is not None and 0 < r.completion_tokens <= 32
        assert r.ttft_s is not None and r.output_sha256
    doc = json.loads((out / "summary.json").read_text())
    assert doc["status"] == "complete"
    expected = rate(summarize(results, models=[BUNDLED_MODEL_ALIAS], categories=CATEGORIES))
    assert doc["rows"] == json.loads(json.dumps(expected))
    (model_run,) = doc["models"]
    assert model_run["idle_watts"] is not None and model_run["idle_watts"] > 0
    assert model_run["warmup_requests"] == 1
    assert (out / "report.html").read_text().count('class="bar"') == len(CATEGORIES)
    assert (out / "proxy.log").exists()
    table = done.stdout
    assert "energy-proxy bench" in table and "J/req" in table and "J/tok" in table
    for category in CATEGORIES:
        assert f"│ {BUNDLED_MODEL_ALIAS} │ {category}" in table
    assert "results in" in table
