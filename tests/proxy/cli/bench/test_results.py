"""Aggregation (hand-computed), and requests.jsonl / requests.csv round trips."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from proxy.cli.bench.files import ResultWriter, read_csv, read_jsonl
from proxy.cli.bench.results import (
    STATUS_COMPLETE,
    STATUS_PARTIAL,
    RequestResult,
    build_summary,
    ci95_half_width,
    percentile,
    summarize,
    t975,
)
from tests.support.bench_results import failed, ok


def cell() -> list[RequestResult]:
    """Model a, category code: two repetitions of two prompts, and one failure."""
    return [
        ok("a", "code", 1.0, rep=0, completion_tokens=10, duration_s=1.0, ttft_s=0.1, tpot_s=0.02,
           co2eq_g=0.1, dynamic_joules=0.5, prompt_tokens=5),
        ok("a", "code", 3.0, rep=0, completion_tokens=10, duration_s=1.0, ttft_s=0.2, tpot_s=0.04,
           co2eq_g=0.3, dynamic_joules=1.5, prompt_tokens=7),
        ok("a", "code", 2.0, rep=1, completion_tokens=20, duration_s=2.0, ttft_s=0.3, tpot_s=None,
           co2eq_g=0.2, dynamic_joules=1.0, prompt_tokens=5),
        ok("a", "code", 4.0, rep=1, completion_tokens=20, duration_s=2.0, ttft_s=0.4, tpot_s=0.06,
           co2eq_g=0.4, dynamic_joules=2.0, prompt_tokens=7),
        # The proxy measured this failed request; it is counted, never in the means.
        failed("a", "code", joules=99.0, completion_tokens=1, duration_s=9.0),
    ]  # fmt: skip


def test_summary_row_by_hand() -> None:
    (row,) = summarize(cell())
    assert row["model"] == "a" and row["category"] == "code"
    assert row["count"] == 4
    assert row["failures"] == 1
    assert row["mean_joules"] == pytest.approx(2.5)
    # sample stdev of 1, 3, 2, 4: sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3)
    assert row["stdev_joules"] == pytest.approx(math.sqrt(5 / 3))
    # repetition means 2.0 and 3.0: s = 0.7071..., t(0.975, 1) = 12.706, n = 2
    assert row["ci95_joules"] == pytest.approx(12.706 * math.sqrt(0.5) / math.sqrt(2))
    assert row["joules_per_token"] == pytest.approx(10.0 / 60.0)
    assert row["tokens_per_s"] == pytest.approx(60.0 / 6.0)
    assert row["mean_co2eq_g"] == pytest.approx(0.25)
    assert row["mean_dynamic_joules"] == pytest.approx(1.25)
    assert row["mean_prompt_tokens"] == pytest.approx(6.0)
    assert row["mean_completion_tokens"] == pytest.approx(15.0)
    assert row["mean_duration_s"] == pytest.approx(1.5)
    # p90 of 0.1, 0.2, 0.3, 0.4: rank 0.9 * 3 = 2.7 -> 0.3 + 0.7 * 0.1
    assert row["p90_ttft_s"] == pytest.approx(0.37)
    assert row["mean_ttft_s"] == pytest.approx(0.25)
    assert row["mean_tpot_s"] == pytest.approx(0.04)  # the request without one is left out
    assert row["methods"] == "constant"


def test_a_cell_where_everything_failed_is_kept_with_its_failures() -> None:
    rows = summarize([failed("a", "sql"), failed("a", "sql", "HTTP 400: bad"), ok("a", "code", 1)])
    sql = next(r for r in rows if r["category"] == "sql")
    assert sql["count"] == 0 and sql["failures"] == 2
    assert sql["mean_joules"] is None and sql["joules_per_token"] is None
    assert sql["p90_ttft_s"] is None


def test_single_values_have_no_spread() -> None:
    (row,) = summarize([ok("a", "code", 2.0, completion_tokens=0, duration_s=0.0)])
    assert row["mean_joules"] == 2.0
    assert row["stdev_joules"] is None and row["ci95_joules"] is None
    assert row["joules_per_token"] is None and row["tokens_per_s"] is None


def test_rows_follow_the_given_model_and_category_order() -> None:
    rs = [ok("b", "math", 1), ok("a", "math", 1), ok("b", "code", 1), ok("z", "other", 1)]
    rows = summarize(rs, models=["a", "b"], categories=["code", "math"])
    assert [(r["model"], r["category"]) for r in rows] == [
        ("a", "math"),
        ("b", "code"),
        ("b", "math"),
        ("z", "other"),
    ]


def test_statistics_helpers() -> None:
    assert percentile([], 90) is None
    assert percentile([5.0], 90) == 5.0
    assert percentile([1.0, 2.0], 50) == pytest.approx(1.5)
    assert percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0
    assert t975(1) == 12.706 and t975(30) == 2.042 and t975(45) == 2.021
    assert t975(10_000) == 1.960
    assert ci95_half_width([1.0]) is None
    # 3 values 1, 2, 3: s = 1, t(0.975, 2) = 4.303
    assert ci95_half_width([1.0, 2.0, 3.0]) == pytest.approx(4.303 / math.sqrt(3))


def test_build_summary_rates_measured_rows_and_says_partial() -> None:
    seen: list[list[dict[str, Any]]] = []

    def rate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        seen.append(rows)
        return [
            {
                **r,
                "stars": 4 if r["mean_joules"] is not None else None,
                "wh_per_1000_queries": None if r["mean_joules"] is None else r["mean_joules"] / 3.6,
            }
            for r in rows
        ]

    rs = [*cell(), failed("a", "sql")]
    doc = build_summary(
        rs,
        [],
        config={"repetitions": 2},
        started_at="s",
        finished_at="f",
        interrupted=True,
        rate=rate,
    )
    assert doc["status"] == STATUS_PARTIAL == "interrupted, partial"
    assert doc["totals"] == {"requests": 6, "ok": 4, "failures": 2}
    assert [r["category"] for r in seen[0]] == ["code", "sql"]
    code, sql = doc["rows"]
    assert code["stars"] == 4 and code["wh_per_1000_queries"] == pytest.approx(2.5 / 3.6)
    assert sql["stars"] is None and sql["wh_per_1000_queries"] is None
    assert {"model": "a", "category": "sql", "error": "HTTP 500: boom", "count": 1} in doc[
        "failure_reasons"
    ]
    done = build_summary(rs, [], config={}, started_at="s", finished_at="f", interrupted=False)
    assert done["status"] == STATUS_COMPLETE
    assert "stars" not in done["rows"][0]
    json.dumps(done, allow_nan=False)  # plain JSON


def awkward() -> list[RequestResult]:
    return [
        *cell(),
        failed("m/ü", "sql", 'HTTP 500: "quoted", comma,\nand a second line', http_status=None),
        ok("a", "code", 1e-9, ttft_s=1 / 3, output_sha256="ab" * 32, request_id="bench-1"),
    ]


def test_jsonl_and_csv_round_trip(tmp_path: Path) -> None:
    results = awkward()
    with ResultWriter(tmp_path) as w:
        for r in results:
            w.add(r)
    assert read_jsonl(tmp_path / "requests.jsonl") == results
    assert read_csv(tmp_path / "requests.csv") == results
    assert summarize(read_csv(tmp_path / "requests.csv")) == summarize(results)


def test_a_line_cut_off_by_a_kill_is_skipped_only_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    good = json.dumps(ok("a", "code", 1.0).to_dict())
    path.write_text(good + "\n" + good[:20])
    assert len(read_jsonl(path)) == 1
    path.write_text(good[:20] + "\n" + good + "\n")
    with pytest.raises(ValueError):
        read_jsonl(path)
