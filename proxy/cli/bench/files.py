"""The output directory: requests.jsonl and requests.csv as results arrive, then
summary.json and report.html.

Each request is appended and flushed as soon as it finishes, so an interrupted or killed
run leaves whole lines behind; summary.json and report.html are written at the end (also
after Ctrl-C), each through a temporary file and a rename, so a reader never sees half.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from proxy.cli.bench.report_html import render_report
from proxy.cli.bench.results import RESULT_FIELDS, RequestResult, from_csv_row, to_csv_row

REQUESTS_JSONL = "requests.jsonl"
REQUESTS_CSV = "requests.csv"
SUMMARY_JSON = "summary.json"
REPORT_HTML = "report.html"


class ResultWriter:
    """Appends each `RequestResult` to requests.jsonl and requests.csv, flushed."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl: IO[str] = open(out_dir / REQUESTS_JSONL, "w", encoding="utf-8")  # noqa: SIM115
        self._csv_file: IO[str] = open(  # noqa: SIM115
            out_dir / REQUESTS_CSV, "w", encoding="utf-8", newline=""
        )
        self._csv = csv.DictWriter(self._csv_file, fieldnames=RESULT_FIELDS)
        self._csv.writeheader()
        self._csv_file.flush()
        self.count = 0

    def add(self, r: RequestResult) -> None:
        self._jsonl.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
        self._jsonl.flush()
        self._csv.writerow(to_csv_row(r))
        self._csv_file.flush()
        self.count += 1

    def close(self) -> None:
        self._jsonl.close()
        self._csv_file.close()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` whole: a reader (or an interrupted run) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    write_atomic(path, json.dumps(doc, indent=2, ensure_ascii=False))


def write_summary(out_dir: Path, summary: Mapping[str, Any]) -> None:
    """summary.json and report.html, the report rendered from the same document."""
    write_json(out_dir / SUMMARY_JSON, summary)
    write_atomic(out_dir / REPORT_HTML, render_report(summary))


def read_jsonl(path: Path) -> list[RequestResult]:
    """requests.jsonl back into results; a last line cut off by a kill is skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(RequestResult.from_dict(json.loads(line)))
        except ValueError:
            if i < len(lines) - 1:
                raise
    return out


def read_csv(path: Path) -> list[RequestResult]:
    with open(path, encoding="utf-8", newline="") as f:
        return [from_csv_row(row) for row in csv.DictReader(f)]
