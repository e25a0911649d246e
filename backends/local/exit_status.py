"""How a child process ended, in words a person can act on (pure).

`subprocess` reports a child killed by a signal as a negative return code (-4 for
SIGILL); a shell reports the same death as 128 + the signal number (132). Both read here
as "SIGILL (illegal instruction)".
"""

from __future__ import annotations

import signal

# What a signal usually means for a compiled inference server, and what to do about it.
_ADVICE = {
    signal.SIGILL: (
        "the compiled llama.cpp inside llama-cpp-python uses CPU instructions this machine "
        "cannot run (a build made for another CPU, or with -march=native on a CPU whose "
        "kernel does not enable them, such as AMX); rebuild it portably: "
        "`./scripts/setup.sh --rebuild-backend` (README: 'The bundled backend')"
    ),
    signal.SIGKILL: (
        "something killed it outright, most often the kernel's out-of-memory killer "
        "(`dmesg | grep -i oom`); free memory or lower --n_ctx"
    ),
    signal.SIGSEGV: (
        "it crashed (segmentation fault); rebuild it (`./scripts/setup.sh --rebuild-backend`) "
        "and, if it persists, report it with the log"
    ),
    signal.SIGBUS: "it crashed (bus error): the model file may be truncated or on a full disk",
    signal.SIGABRT: "it aborted: the log's last lines say why",
}

_DESCRIPTIONS = {
    signal.SIGILL: "illegal instruction",
    signal.SIGKILL: "killed",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGBUS: "bus error",
    signal.SIGABRT: "aborted",
    signal.SIGTERM: "terminated",
    signal.SIGINT: "interrupted",
}


def exit_signal(returncode: int) -> signal.Signals | None:
    """The signal that ended the child: from subprocess's -N, or a shell's 128 + N."""
    number = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    try:
        return signal.Signals(number) if number else None
    except ValueError:
        return None


def describe_exit(returncode: int) -> str:
    """`"SIGILL (illegal instruction), exit code -4"` or `"exit code 3"`."""
    sig = exit_signal(returncode)
    if sig is None:
        return f"exit code {returncode}"
    what = _DESCRIPTIONS.get(sig)
    return f"{sig.name}{f' ({what})' if what else ''}, exit code {returncode}"


def exit_advice(returncode: int) -> str:
    """What to do about it; "" when there is nothing specific to say."""
    sig = exit_signal(returncode)
    return _ADVICE.get(sig, "") if sig is not None else ""
