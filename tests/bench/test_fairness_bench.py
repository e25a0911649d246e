"""bench/fairness.py runs its scenarios in processes: the figures must not depend on it."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

from bench import fairness


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jobs: int) -> list[dict[str, str]]:
    out = tmp_path / f"jobs{jobs}.csv"
    argv = ["fairness", "--quick", "--per-kind", "1", "--modes", "model,equal"]
    monkeypatch.setattr(sys, "argv", [*argv, "--jobs", str(jobs), "--csv", str(out)])
    assert fairness.main() == 0
    with out.open(newline="") as f:
        return list(csv.DictReader(f))


def test_processes_side_by_side_give_the_figures_one_process_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    one = _run(tmp_path, monkeypatch, 1)
    two = _run(tmp_path, monkeypatch, 2)
    assert len(one) == 160
    assert one == two
    # Every scenario was scored, and the shares differ from one scenario to the next.
    assert len({row["model"] for row in one}) > 10
    assert all(0.0 <= float(row["equal"]) <= 1.0 for row in one)
    assert "within 0.05 in" in capsys.readouterr().out
