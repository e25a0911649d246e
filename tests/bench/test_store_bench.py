"""bench/store.py at small sizes, on both stores: every figure it reports is there and
consistent with the records it wrote (API and SQL fills)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.paths import REPO_ROOT

ROOT = REPO_ROOT


def test_store_bench_reports_every_figure_for_both_stores(tmp_path: Path) -> None:
    out = tmp_path / "store.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.store", "--sizes", "2000,5000",
         "--api-max", "2000", "--rate", "500", "--seconds", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    base, *cases = results
    assert base["store"] == "none" and base["sustained"]["ticks"] > 0
    assert [(r["store"], r["records"], r["filled"]) for r in cases] == [
        ("sqlite", 2000, "api"),
        ("sqlite", 5000, "sql"),
        ("postgresql", 2000, "api"),
        ("postgresql", 5000, "sql"),
    ]
    for r in cases:
        assert r["stored"] == r["records"]
        # 1 in 50 is a 499: the summary counts the successful ones, API or SQL alike.
        assert r["summary_count"] == r["records"] - r["records"] // 50
        assert r["summary_rows"] == 18  # 3 models x 6 categories
        assert 50 < r["bytes_per_record"] < 5000
        assert r["summary_7d_ms"]["p50"] > 0 and r["get_ms"] > 0
        s = r["sustained"]
        assert s["kept_up"] and s["dropped"] == 0 and s["ticks"] > 0
        if r["filled"] == "api":
            assert r["records_per_s"] > 0 and r["fill_stall_max_ms"] >= 0
    table = done.stdout
    assert "(no store)" in table and "targets:" in table
    assert table.count("sqlite") == 2 and table.count("postgresql") == 2
