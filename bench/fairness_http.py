"""The fair split cold, in real time, through the whole HTTP stack: issue 31's four
engines, each a burst of chat, RAG and mid-sized prompts right after the proxy starts.

    python -m bench.fairness_http [--runs 3] [--per-kind 16] [--modes model,equal]
                                  [--engines "NAME;..."]

The backend is the batching engine simulator served over HTTP (tests/support/fakes/
batching_backend.py: it reads as a vLLM, with its running/waiting gauges or without),
its steps five times as long as an H100's for an 8B model (a Python event loop keeps
17 ms steps better than 3.4 ms ones); the client is the real `openai`, streaming; the
proxy is `create_app` on a socket, metering the simulator's GPU, its gauges read at
their real period (every 5 s; at once and every 0.25 s while requests may wait). No
warm-up: the burst is the first traffic the proxy sees. For each engine and mode it
prints the kinds' share error (mean |told share - true share| over chat, RAG and mid),
how many requests' bands held their truth, the bands' median half-width, and what the
proxy had learnt (queue capacity, prefill chunk). Nothing asserts here;
tests/proxy/relay/test_fairness_e2e.py checks one engine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from tests.support.fairness_http import KINDS, HttpOutcome, run_http
from tests.support.fakes.batching_backend import scaled
from tests.support.fakes.batching_engine import EngineConfig

STEP_SCALE = 5.0
# name -> (engine, whether it serves vLLM's gauges)
ENGINES: dict[str, tuple[EngineConfig, bool]] = {
    "admits all, whole prompts": (EngineConfig(), False),
    "admits all, whole prompts, gauges": (EngineConfig(), True),
    "12 admitted, chunks of 2048": (EngineConfig(max_running=12, prefill_chunk=2048), False),
    "12 admitted, chunks of 2048, gauges": (
        EngineConfig(max_running=12, prefill_chunk=2048),
        True,
    ),
    "8 admitted, chunks of 512, gauges": (EngineConfig(max_running=8, prefill_chunk=512), True),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--per-kind", type=int, default=16)
    ap.add_argument("--modes", default="model,equal")
    ap.add_argument("--engines", default=";".join(ENGINES), help="names, separated by ;")
    args = ap.parse_args()
    modes = args.modes.split(",")
    names = [n.strip() for n in args.engines.split(";") if n.strip()]
    print(
        f"cold bursts of {args.per_kind} x {len(KINDS)} kinds ({', '.join(KINDS)}), "
        f"{args.runs} runs each, steps x{STEP_SCALE:g}"
    )
    print(
        f"{'engine':<38}{'mode':<7}{'error per run':<26}{'band held':>11}{'half-width':>12}  learnt"
    )
    worst: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            config, gauges = ENGINES[name]
            for mode in modes:
                outs = [
                    run_http(
                        Path(tmp) / f"{len(worst)}-{mode}-{i}",
                        scaled(config, STEP_SCALE),
                        mode,
                        gauges=gauges,
                        warm=False,
                        per_kind=args.per_kind,
                    )
                    for i in range(args.runs)
                ]
                print(_row(name, mode, outs, args.per_kind))
                worst[f"{name} / {mode}"] = max(o.error for o in outs)
    print()
    for key, err in worst.items():
        print(f"worst {err:.3f}  {key}")
    return 0


def _row(name: str, mode: str, outs: list[HttpOutcome], per_kind: int) -> str:
    errors = " ".join(f"{o.error:.3f}" for o in outs)
    held = sum(round(o.covered * per_kind * len(KINDS)) for o in outs)
    total = per_kind * len(KINDS) * len(outs)
    half = statistics.median(o.half_width for o in outs)
    cm = outs[-1].cost_model
    learnt = (
        f"capacity {cm.get('queue_capacity')} ({cm.get('queue_capacity_source')}), "
        f"chunk {_fmt(cm.get('prefill_chunk_tokens'))} ({cm.get('prefill_chunk_source')})"
    )
    return f"{name:<38}{mode:<7}{errors:<26}{f'{held}/{total}':>11}{half:>12.2f}  {learnt}"


def _fmt(value: object) -> str:
    return f"{value:.0f}" if isinstance(value, int | float) else "-"


if __name__ == "__main__":
    sys.exit(main())
