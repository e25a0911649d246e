"""Child servers that die while starting say why, even without a log file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from backends.local.launch import ChildServer, LaunchError, free_port, proxy_server


def test_a_child_without_a_log_quotes_the_end_of_what_it_printed() -> None:
    # More output than the tail keeps, then the reason on stderr: the pipe never fills up
    # (the child would hang) and the reason survives.
    code = (
        "import sys; print('x' * 100_000); print('bad flag --frob', file=sys.stderr); sys.exit(2)"
    )
    child = ChildServer([sys.executable, "-c", code], free_port(), "/", name="child")
    with pytest.raises(LaunchError) as err:
        child.start()
    message = str(err.value)
    assert "child exited with exit code 2 while starting" in message
    assert message.rstrip().endswith("bad flag --frob")
    assert len(message) < 9000
    assert child.proc is not None and child.proc.returncode == 2


def test_the_proxy_refusing_its_settings_says_which_one() -> None:
    with pytest.raises(LaunchError) as err:
        proxy_server("http://127.0.0.1:9", extra_args=["--summary-window", "fortnight"]).start()
    assert "exited with exit code 2 while starting" in str(err.value)
    assert "fortnight" in str(err.value)


def test_tests_keep_the_default_store_out_of_the_users_home() -> None:
    # The session fixture in tests/conftest.py: a proxy started without --db by any test
    # writes $XDG_STATE_HOME, which is this run's own directory.
    state = Path(os.environ["XDG_STATE_HOME"])
    assert state.is_dir()
    assert not state.is_relative_to(Path.home() / ".local")
