"""A dead child's exit, in words: subprocess's -N and a shell's 128 + N alike."""

from __future__ import annotations

import signal
import subprocess
import sys

from backends.local.exit_status import describe_exit, exit_advice, exit_signal


def test_a_signal_from_subprocess_and_from_a_shell_read_the_same() -> None:
    assert exit_signal(-4) is signal.SIGILL
    assert exit_signal(132) is signal.SIGILL  # what a shell reports for the same death
    assert describe_exit(-4) == "SIGILL (illegal instruction), exit code -4"
    assert describe_exit(132) == "SIGILL (illegal instruction), exit code 132"
    assert describe_exit(-9) == "SIGKILL (killed), exit code -9"


def test_plain_exit_codes_are_not_signals() -> None:
    for code in (0, 1, 2, 127, 128):
        assert exit_signal(code) is None
        assert describe_exit(code) == f"exit code {code}"
        assert exit_advice(code) == ""
    assert exit_signal(255) is None  # 128 + 127: no such signal


def test_advice_says_what_to_do() -> None:
    assert "--rebuild-backend" in exit_advice(-4)
    assert "out-of-memory" in exit_advice(-9)
    assert exit_advice(-15) == ""  # SIGTERM: someone stopped it; nothing to fix


def test_a_real_child_killed_by_sigill() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, resource, signal; resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); "
            "os.kill(os.getpid(), signal.SIGILL)",
        ],
        check=False,
    )
    assert describe_exit(done.returncode) == "SIGILL (illegal instruction), exit code -4"
