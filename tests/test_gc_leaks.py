"""The suite's garbage collection after each test (tests/conftest.py) puts a leak on the
test that leaked. Without it, a socket left in a reference cycle warned whenever the
collector next ran, failing a random later test: issue 10's "flaky" hypothesis test was
such a victim of a never-closed OpenAI client in tests/e2e."""

from __future__ import annotations

import pytest

from tests.support.paths import REPO_ROOT

ROOT = REPO_ROOT
pytest_plugins = ["pytester"]

LEAKY_THEN_BUSY = """
import gc
import socket

KEPT = []


def test_leaks_a_socket_in_a_cycle():
    holder = {"s": socket.socket()}
    holder["self"] = holder  # only the cyclic collector frees it, and warns then
    KEPT.append(holder)
    gc.collect()  # long-lived by now, like a module-scoped fixture's client
    KEPT.clear()


def test_allocates_a_lot_afterwards():
    junk = [[i] * 3 for i in range(200_000)]
    assert len(junk) == 200_000
"""


def run_inner(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, with_fixture: bool
) -> pytest.RunResult:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeini(
        "[pytest]\nfilterwarnings = error\nasyncio_default_fixture_loop_scope = function\n"
    )
    if with_fixture:
        pytester.makeconftest(
            "from tests.conftest import _collect_garbage_after_each_test  # noqa: F401\n"
        )
    pytester.makepyfile(test_inner=LEAKY_THEN_BUSY)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")


def test_a_leak_fails_the_test_that_leaked(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_inner(pytester, monkeypatch, with_fixture=True)
    result.assert_outcomes(passed=2, errors=1)  # the error is the leaking test's teardown
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaks_a_socket_in_a_cycle*"])
    assert "test_allocates_a_lot_afterwards FAILED" not in result.stdout.str()


def test_without_it_the_next_busy_test_is_the_victim(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What happened before: the leaking test passes, the innocent one fails."""
    result = run_inner(pytester, monkeypatch, with_fixture=False)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*FAILED test_inner.py::test_allocates_a_lot_afterwards*"])
