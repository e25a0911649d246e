"""report.html: parses, is self-contained, and its numbers are summary.json's."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from metering.ratings.score import rate
from proxy.cli.bench.files import write_summary
from proxy.cli.bench.report_html import nice_ticks, render_report
from proxy.cli.bench.results import build_summary
from proxy.cli.bench.table import fmt, summary_table
from tests.support.bench_results import failed, ok

SVG = "{http://www.w3.org/2000/svg}"


def summary(interrupted: bool = False) -> dict[str, Any]:
    rs = []
    for model, scale in (("small <b>&", 1.0), ("big", 3.0)):
        for cat, base in (("code", 2.0), ("math", 5.0), ("sql", 1.0)):
            for rep in range(2):
                rs.append(
                    ok(model, cat, base * scale + rep * 0.5, rep=rep, completion_tokens=8,
                       duration_s=0.5 * scale + rep, ttft_s=0.1 * scale, tpot_s=0.01,
                       co2eq_g=base * scale / 7500, method="cpu-estimate")
                )  # fmt: skip
    rs += [failed("big", "sql"), failed("small <b>&", "other")]  # 'other': nothing but failures
    runs: list[dict[str, Any]] = [
        {"model": "small <b>&", "idle_watts": 12.5, "requests": 7, "failures": 1, "wall_s": 3.0},
        {"model": "big", "idle_watts": None, "requests": 7, "failures": 1, "wall_s": 9.0},
    ]
    return build_summary(
        rs,
        runs,
        config={"proxy": "http://127.0.0.1:1", "models": ["small <b>&", "big"], "warmup": 1},
        started_at="2024-01-01T00:00:00+00:00",
        finished_at="2024-01-01T00:01:00+00:00",
        interrupted=interrupted,
        rate=lambda rows: rate(rows, min_count=2),
    )


class Cells(HTMLParser):
    """Rows of the table with id `table_id`: a list of {field: (data-value, text)}."""

    def __init__(self, table_id: str) -> None:
        super().__init__()
        self.table_id = table_id
        self.inside = False
        self.rows: list[dict[str, tuple[str | None, str]]] = []
        self.field: tuple[str, str | None] | None = None
        self.text = ""
        self.scripts = 0
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key):
                self.external.append(f"{tag} {key}={a[key]}")
        if tag == "script":
            self.scripts += 1
            assert a.get("type") == "application/json"  # data only, never code
        if tag == "table":
            self.inside = a.get("id") == self.table_id
        elif self.inside and tag == "tr":
            self.rows.append({})
        elif self.inside and tag == "td":
            self.field = (a["data-field"] or "", a.get("data-value"))
            self.text = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.inside = False
        elif tag == "td" and self.field is not None:
            key, value = self.field
            self.rows[-1][key] = (value, self.text)
            self.field = None

    def handle_data(self, data: str) -> None:
        if self.field is not None:
            self.text += data


def parse(html: str, table_id: str = "summary-table") -> Cells:
    p = Cells(table_id)
    p.feed(html)
    p.close()
    return p


def svgs(html: str) -> dict[str, ET.Element]:
    found = re.findall(r"<svg\b.*?</svg>", html, flags=re.S)
    roots = [ET.fromstring(s) for s in found]
    return {str(r.get("id")): r for r in roots}


def test_summary_table_numbers_equal_summary_json(tmp_path: Path) -> None:
    write_summary(tmp_path, summary())
    doc = json.loads((tmp_path / "summary.json").read_text())
    html = (tmp_path / "report.html").read_text()
    cells = parse(html)
    body_rows = [r for r in cells.rows if r]  # the header row has no td
    assert len(body_rows) == len(doc["rows"]) == 7
    checked = 0
    for row, shown in zip(doc["rows"], body_rows, strict=True):
        for key, (value, text) in shown.items():
            assert text == fmt(row[key]), key
            if isinstance(row[key], int | float) and not isinstance(row[key], bool):
                assert value is not None and json.loads(value) == row[key], key
                checked += 1
            else:
                assert value is None
    assert checked > 7 * 8
    assert {"stars", "wh_per_1000_queries", "ci95_joules", "p90_ttft_s"} <= set(body_rows[0])


def test_plots_carry_summary_values(tmp_path: Path) -> None:
    doc = summary()
    html = render_report(doc)
    plots = svgs(html)
    assert set(plots) == {"energy-bars", "energy-latency"}
    measured = {(r["model"], r["category"]): r for r in doc["rows"] if r["mean_joules"]}
    bars = [e for e in plots["energy-bars"].iter(f"{SVG}rect") if e.get("class") == "bar"]
    assert {(b.get("data-model"), b.get("data-category")) for b in bars} == set(measured)
    ratios = set()
    for b in bars:
        row = measured[(str(b.get("data-model")), str(b.get("data-category")))]
        assert json.loads(str(b.get("data-value"))) == row["mean_joules"]
        ratios.add(round(float(str(b.get("height"))) / row["mean_joules"], 1))
    assert len(ratios) == 1  # heights on one linear scale
    failed_marks = [e for e in plots["energy-bars"].iter(f"{SVG}text") if e.get("class")]
    assert [(m.get("data-model"), m.get("data-category")) for m in failed_marks] == [
        ("small <b>&", "other")
    ]
    points = [e for e in plots["energy-latency"].iter(f"{SVG}circle")]
    assert len(points) == len(measured)
    for p in points:
        row = measured[(str(p.get("data-model")), str(p.get("data-category")))]
        assert json.loads(str(p.get("data-x"))) == row["mean_duration_s"]
        assert json.loads(str(p.get("data-y"))) == row["mean_joules"]


def test_report_is_self_contained_and_embeds_the_summary() -> None:
    doc = summary()
    html = render_report(doc)
    cells = parse(html)
    assert cells.external == []  # no CDN, no stylesheet or image to fetch
    assert cells.scripts == 1
    data = re.search(
        r'<script type="application/json" id="summary-data">(.*?)</script>', html, re.S
    )
    assert data is not None and json.loads(data.group(1)) == doc
    assert "ESTIMATE" in html
    assert 'id="status">complete<' in html
    models = parse(html, "models-table").rows
    assert [r["model"][1] for r in models if r] == ["small <b>&", "big"]


def test_partial_report_says_so() -> None:
    html = render_report(summary(interrupted=True))
    assert 'class="status partial" id="status">interrupted, partial<' in html


def test_empty_summary_still_renders() -> None:
    doc = build_summary([], [], config={}, started_at="s", finished_at="f", interrupted=True)
    html = render_report(doc)
    assert set(svgs(html)) == {"energy-bars", "energy-latency"}
    assert "No model finished its pass" in html


@pytest.mark.parametrize(
    ("top", "ticks"),
    [(0.0, [0.0, 1.0]), (4.2, [0, 1, 2, 3, 4, 5]), (0.037, [0, 0.01, 0.02, 0.03, 0.04]),
     (900.0, [0, 200, 400, 600, 800, 1000]), (5.0, [0, 1, 2, 3, 4, 5])],
)  # fmt: skip
def test_nice_ticks(top: float, ticks: list[float]) -> None:
    assert nice_ticks(top) == pytest.approx(ticks)


def test_terminal_table_shows_the_summary_values() -> None:
    doc = summary()
    console = Console(record=True, width=200, color_system=None)
    console.print(summary_table(doc["rows"]))
    out = console.export_text()
    for header in ("J/req", "J/tok", "gCO2eq", "tok/s", "±sd J", "TTFT90 s", "stars"):
        assert header in out
    code = doc["rows"][0]
    line = next(ln for ln in out.splitlines() if "small <b>&" in ln and "│ code" in ln)
    for key in ("mean_joules", "joules_per_token", "mean_co2eq_g", "tokens_per_s"):
        assert fmt(code[key]) in line
