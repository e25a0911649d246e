"""Load the bundled model and generate a few tokens in a child process, and say how it went.

A llama.cpp built for the wrong CPU does not raise: the process dies of SIGILL. So the
generation runs in a child, and a dead child is described by its signal and exit code,
with what to do (backends/local/exit_status.py). The child prints its build's system info
first, so a build's instruction sets are known even when generation then crashes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.local.exit_status import describe_exit, exit_advice

SMOKE_PROMPT = "The capital of France is"

_CHILD = r"""
import json, sys, time
import llama_cpp
print(json.dumps({"version": llama_cpp.__version__,
                  "system_info": llama_cpp.llama_print_system_info().decode()}), flush=True)
t0 = time.perf_counter()
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, n_threads=int(sys.argv[2]),
                      verbose=False, seed=0)
t1 = time.perf_counter()
out = llm.create_completion(sys.argv[3], max_tokens=int(sys.argv[4]), temperature=0.0)
t2 = time.perf_counter()
print(json.dumps({"text": out["choices"][0]["text"],
                  "completion_tokens": out["usage"]["completion_tokens"],
                  "load_s": t1 - t0, "generate_s": t2 - t1}), flush=True)
"""


@dataclass(frozen=True, slots=True)
class SmokeResult:
    returncode: int | None  # None: it ran past the timeout and was killed
    version: str = ""
    system_info: str = ""
    text: str = ""
    completion_tokens: int = 0
    load_s: float = 0.0
    generate_s: float = 0.0
    stderr_tail: str = ""
    timeout_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.completion_tokens > 0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.generate_s if self.generate_s > 0 else 0.0

    def failure(self) -> str:
        """What went wrong and what to do, in one paragraph ("" when it worked)."""
        if self.ok:
            return ""
        if self.returncode is None:
            return (
                f"the bundled model did not finish generating within {self.timeout_s:.0f} s "
                "(a machine this slow, or one out of memory, cannot run the demo backend)"
            )
        if self.returncode == 0:
            return "the bundled model loaded but generated no token"
        how = f"the bundled backend's test process died with {describe_exit(self.returncode)}"
        advice = exit_advice(self.returncode)
        tail = self.stderr_tail.strip()
        return (
            how
            + (f": {advice}" if advice else "")
            + (f"\nits last output:\n{tail}" if tail else "")
        )


def run_smoke(
    model_path: Path,
    *,
    python: str = sys.executable,
    env: dict[str, str] | None = None,
    max_tokens: int = 8,
    timeout_s: float = 300.0,
) -> SmokeResult:
    """Generate `max_tokens` tokens from the bundled model in a child process."""
    argv = [
        python,
        "-c",
        _CHILD,
        str(model_path),
        str(max(1, os.cpu_count() or 1)),
        SMOKE_PROMPT,
        str(max_tokens),
    ]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        return SmokeResult(None, stderr_tail=_tail(exc.stderr), timeout_s=timeout_s)
    fields: dict[str, Any] = {}
    for line in done.stdout.splitlines():
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(doc, dict):
            fields.update(doc)
    known = set(SmokeResult.__dataclass_fields__) - {"returncode", "stderr_tail", "timeout_s"}
    return SmokeResult(
        done.returncode,
        stderr_tail=_tail(done.stderr),
        timeout_s=timeout_s,
        **{k: v for k, v in fields.items() if k in known},
    )


def _tail(stream: str | bytes | None, lines: int = 8) -> str:
    if stream is None:
        return ""
    text = stream.decode("utf-8", "replace") if isinstance(stream, bytes) else stream
    return "\n".join(text.strip().splitlines()[-lines:])
