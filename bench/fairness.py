"""How fairly each attribution mode splits a batching engine's energy, against the truth.

    python -m bench.fairness [--per-kind 8] [--costs] [--cold]

The engine is the simulator in tests/support/fakes/batching_engine.py (continuous batching, FIFO
admission under a limit, chunked prefill, an H100-shaped cost model) and the truth its
Shapley split of every step (a request pays its own prefill and decode work in the step and
an equal share of the step's fixed cost with the others in it; nothing while it waits).
The proxy's own attribution code splits what a perfect energy counter reads at each
request's start, first token and end (tests/support/fairness.py). For every engine, mix of
request kinds and load, the table shows each mode's error: the mean absolute difference
between the kinds' shares of the dynamic energy and the truth's (0.10 = ten points off).

--costs also runs the cost model with prefill and the step's fixed cost at half and twice
the H100-shaped figures and prints each mode's worst and mean error over all of it.
--cold: the proxy has not seen the backend's metrics before the run (it learns the
capacity from scrapes during it).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from metering.accounting.attribution import MODES
from tests.support.fairness import (
    ENGINES,
    LOADS,
    MIXES,
    cost_variants,
    requests_for,
    run_scenario,
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--per-kind", type=int, default=8, help="requests of each kind")
    p.add_argument("--costs", action="store_true", help="also vary the cost model")
    p.add_argument("--cold", action="store_true", help="no capacity known before the run")
    args = p.parse_args()
    modes = list(MODES)
    known = "learns the capacity during the run" if args.cold else "knows the capacity already"
    print(
        f"error = mean |share - truth| over the kinds; {args.per_kind} requests of each kind; "
        f"the proxy {known}"
    )
    head = f"{'engine':<28} {'mix':<17} {'load':<20} " + " ".join(f"{m:>7}" for m in modes)
    print(head + "  waited  shares (queue / truth)")
    worst = dict.fromkeys(modes, 0.0)
    never_worse = True
    for ename, engine in ENGINES.items():
        for mname, mix in MIXES.items():
            for lname, rate in LOADS.items():
                errors = {}
                for mode in modes:
                    reqs = requests_for(mix, args.per_kind, rate)
                    out = run_scenario(engine, reqs, mode, warm=not args.cold)
                    errors[mode] = out
                    worst[mode] = max(worst[mode], out.error)
                q = errors["queue"]
                never_worse &= q.error <= errors["equal"].error + 1e-12
                shares = " ".join(f"{k} {a:.2f}/{b:.2f}" for k, (a, b) in q.shares.items())
                cells = " ".join(f"{errors[m].error:>7.3f}" for m in modes)
                print(f"{ename:<28} {mname:<17} {lname:<20} {cells}  {q.waited:>6}  {shares}")
    print("worst: " + ", ".join(f"{m} {worst[m]:.3f}" for m in modes))
    print(f"queue never worse than equal: {'yes' if never_worse else 'NO'}")
    if args.costs:
        print("\nacross cost models (prefill and fixed step cost at x0.5 and x2):")
        errs: dict[str, list[float]] = {m: [] for m in modes}
        worse = 0
        for cost in cost_variants().values():
            for engine in ENGINES.values():
                cfg = dataclasses.replace(engine, cost=cost)
                for mix in MIXES.values():
                    for rate in LOADS.values():
                        got = {
                            m: run_scenario(cfg, requests_for(mix, args.per_kind, rate), m).error
                            for m in modes
                        }
                        for m in modes:
                            errs[m].append(got[m])
                        worse += got["queue"] > got["equal"] + 1e-12
        n = len(errs["queue"])
        for m in modes:
            print(
                f"  {m:<7} worst {max(errs[m]):.3f}  mean {sum(errs[m]) / n:.4f}  ({n} scenarios)"
            )
        print(f"  queue worse than equal in {worse} of {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
