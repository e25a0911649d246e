"""The token cross-check's arithmetic, by hand."""

from __future__ import annotations

from backends.crosscheck import Baseline, TokenTally, rebase, untracked_tokens


def test_baseline_is_taken_at_the_first_read_and_kept() -> None:
    tally = TokenTally(prompt=3, completion=2)
    base = rebase(None, 100.0, 50.0, tally)
    assert base == Baseline(100.0, 50.0, 3, 2, 100.0, 50.0)
    assert untracked_tokens(base, 100.0, 50.0, tally) == (0.0, 0.0)
    tally.prompt, tally.completion = 13, 22  # the proxy finished 10 + 20 more
    base = rebase(base, 110.0, 70.0, tally)
    assert base == Baseline(100.0, 50.0, 3, 2, 110.0, 70.0)
    assert untracked_tokens(base, 110.0, 70.0, tally) == (0.0, 0.0)
    assert untracked_tokens(base, 117.0, 70.0, tally) == (7.0, 0.0)  # 7 without the proxy


def test_a_restarted_backend_starts_a_new_baseline() -> None:
    tally = TokenTally(prompt=50, completion=60)
    base = Baseline(0.0, 0.0, 3, 2, 100.0, 50.0)  # counted from 0, last read at 100 / 50
    new = rebase(base, 4.0, 1.0, tally)  # below the last read, if not below the baseline
    assert new == Baseline(4.0, 1.0, 50, 60, 4.0, 1.0)
    assert untracked_tokens(new, 4.0, 1.0, tally) == (0.0, 0.0)
