"""bench/page.py against a proxy over the fake backend: it sends the demo's prompts,
measures loads of the page and writes the screenshot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import serve_proxy
from tests.support.paths import REPO_ROOT

ROOT = REPO_ROOT


def test_page_bench_reports_weight_and_render_times(fake_server: str, tmp_path: Path) -> None:
    shot = tmp_path / "page.png"
    with serve_proxy(tmp_path, fake_server) as url:
        done = subprocess.run(
            [sys.executable, "-m", "bench.page", "--url", url, "--loads", "2",
             "--screenshot", str(shot)],
            capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "sent 6 prompts" in out
    rows = re.findall(r"^\s+(\d)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert [r[0] for r in rows] == ["1", "2"]
    page_bytes = [int(r[1]) for r in rows]
    html = (ROOT / "proxy" / "live" / "page.html").stat().st_size
    assert all(html < b <= 100_000 for b in page_bytes), page_bytes
    assert re.search(r"weight: \d+ bytes at most \(budget 100,000\)", out)
    assert shot.read_bytes().startswith(b"\x89PNG")
