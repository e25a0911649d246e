"""Where things are in the repository, for tests and bench scripts (one place, not a
`parents[N]` per file that breaks when a file moves)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTS = REPO_ROOT / "tests"
TEST_DATA = TESTS / "data"
