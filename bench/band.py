"""Does the band cover the truth? Calibrated on one half of the fairness scenarios,
scored on the other.

    python -m bench.band [--quick] [--per-kind 8] [--jobs N] [--save FILE | --load FILE]

Every scenario of bench/fairness.py is served in the default mode, and a group that
reaches the fit (`fitted`: 60 s of traffic before the scored round, gauges read, on every
cost, engine, load and sensor). A request's state (metering/accounting/band.py STATES):
the defaults, a fit used early (fewer than 60 intervals, once it ruled the defaults out)
or a settled fit; the queue's capacity known or unsure; the class of the sensor. For
each scored request: how far the dynamic joules it was told are from the truth's (the
engine's Shapley share), in joules, beside the band's sources of error
(metering/accounting/band.py: the coefficients, the sensor's resolution and placement,
its own work, the fit's residual, the queue), and the state it was split in. Scenarios go
to the calibration half or the scoring half by a hash of their name.

On the calibration half, for each state of the fit, the factors of the sources that make
the band cover TARGET of the requests in every row of the tables (each value of each
dimension), as narrow as that allows (the median half-width, (high - low) / 2 / joules):
a coordinate search over each factor, with the overall scale set by the worst row. On
the scoring half: the band's coverage as the proxy tells it now and with those factors,
and its median half-width, by each dimension.

The factors printed are what metering/accounting/band.py (SCALE_DEFAULTS, SCALE_FITTED)
should hold; once it does, "as told" and "calibrated" agree. Nothing asserts.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pickle
import sys
import zlib
from collections import defaultdict
from dataclasses import dataclass, replace

from bench.fairness import Scenario, outcome, scenarios
from metering.accounting.band import SCALES, STATES, BandScale, BandTerms, band_j

TARGET = 0.9
MARGIN = 0.01  # calibrate to TARGET + MARGIN: the scoring half is other scenarios
DIMS = ("engine", "cost", "load", "mix", "sensor", "gauges", "warm")
FACTORS = ("coefficients", "resolution", "own_work", "residual", "queue", "crowd", "placement")
# The coefficients' term is each coefficient's own spread (a standard deviation of its
# logarithm: the hosts' around the defaults, or the fit's error) in joules: however well
# other terms covered the bench's hosts, a band never counts less of it than a 90 %
# interval of that spread (1.645 of it) under the defaults, nor less than one spread once
# fitted. Calibrated lower, the band held the bench's truths and missed real time's.
COEFFICIENTS_FLOOR_FIT = 1.0
GRID = (0.0, 0.125, 0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 8.0)
SWEEPS = 4


@dataclass(frozen=True, slots=True)
class Row:
    error_j: float  # |dynamic joules told - truth|
    terms: BandTerms
    keys: tuple[str, ...]  # the scenario's value of each of DIMS


def _rows(job: tuple[Scenario, int]) -> list[Row]:
    sc, per_kind = job
    out = outcome(sc, "model", per_kind)
    keys = tuple(str(getattr(sc, d)) for d in DIMS)
    rows = []
    for rid, (error_rel, _, _) in out.bands.items():
        terms = out.terms.get(rid)
        if terms is not None:
            rows.append(Row(error_rel * terms.joules, terms, keys))
    return rows


def calibration_half(sc: Scenario) -> bool:
    return zlib.crc32(str(sc).encode()) % 2 == 0


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, int(q * len(s)))]


def _groups(rows: list[Row]) -> list[list[int]]:
    """Indices of the rows in each row of the tables (each value of each dimension)."""
    by: dict[tuple[int, str], list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        for d, key in enumerate(r.keys):
            by[(d, key)].append(i)
    return list(by.values())


def _needed(rows: list[Row], groups: list[list[int]], scale: BandScale) -> tuple[float, float]:
    """The overall factor `scale` needs for every group to reach TARGET + MARGIN, and the
    median half-width (over joules) it then gives."""
    widths = [band_j(r.terms, scale) for r in rows]
    ratios = [
        (r.error_j / w if w > 0.0 else (0.0 if r.error_j <= 0.0 else float("inf")))
        for r, w in zip(rows, widths, strict=True)
    ]
    k = max(quantile([ratios[i] for i in g], TARGET + MARGIN) for g in groups)
    if k == float("inf"):
        return k, k
    rel = [k * w / r.terms.joules for r, w in zip(rows, widths, strict=True) if r.terms.joules > 0]
    return k, quantile(rel, 0.5)


def calibrate(rows: list[Row], state: str = "") -> BandScale:
    """The narrowest factors (median half-width) that cover TARGET in every group, the
    coefficients' at least their floor for the `state` (below)."""
    if not rows:
        return BandScale()
    groups = _groups(rows)
    best = BandScale()
    k, width = _needed(rows, groups, best)
    for _ in range(SWEEPS):
        for name in FACTORS:
            for value in GRID:
                trial = replace(best, **{name: value})
                tk, tw = _needed(rows, groups, trial)
                if tw < width:
                    best, k, width = trial, tk, tw
    if k == float("inf"):
        return best
    floor = COEFFICIENTS_FLOOR_FIT if state.startswith(("fitted", "early fit")) else 1.645
    scaled = BandScale(*(k * getattr(best, n) for n in FACTORS))
    return replace(scaled, coefficients=max(floor, scaled.coefficients))


def coverage(rows: list[Row], scales: dict[str, BandScale]) -> tuple[float, float]:
    """The share of rows the band covers, and its median half-width over joules."""
    if not rows:
        return float("nan"), float("nan")
    hits, rel = 0, []
    for r in rows:
        w = band_j(r.terms, scales[r.terms.state])
        hits += r.error_j <= w
        if r.terms.joules > 0:
            rel.append(w / r.terms.joules)
    return hits / len(rows), quantile(rel, 0.5)


def _fmt(scale: BandScale) -> str:
    return ", ".join(f"{n} {getattr(scale, n):.2f}" for n in FACTORS)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--per-kind", type=int, default=8, help="requests of each kind per round")
    p.add_argument("--quick", action="store_true", help="a fixed sample of the scenarios")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes")
    p.add_argument("--save", help="also keep every scored request's row in this file")
    p.add_argument("--load", help="calibrate and score the rows kept by --save, not a new run")
    args = p.parse_args()
    if args.load:
        with open(args.load, "rb") as f:
            pairs = pickle.load(f)  # a file this bench wrote
        scs = [sc for sc, _ in pairs]
    else:
        scs = scenarios(args.quick, fitted=True)
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            results = pool.map(_rows, [(sc, args.per_kind) for sc in scs], chunksize=4)
        pairs = list(zip(scs, results, strict=True))
    if args.save:
        with open(args.save, "wb") as f:
            pickle.dump(pairs, f)
    calib = [r for sc, rs in pairs if calibration_half(sc) for r in rs]
    scored = [r for sc, rs in pairs if not calibration_half(sc) for r in rs]
    found = {st: calibrate([r for r in calib if r.terms.state == st], st) for st in STATES}
    print(f"{len(scs)} scenarios; calibration half {len(calib)} requests, scoring half "
          f"{len(scored)}; target {TARGET:.0%} in every row")  # fmt: skip
    print("\nfactors found on the calibration half (metering/accounting/band.py SCALES):")
    for st in STATES:
        print(f"  {st:<26} {_fmt(found[st])}")
    print("\nscoring half: coverage as told (median half-width) / calibrated")
    for st in STATES:
        mine = [r for r in scored if r.terms.state == st]
        ct, wt = coverage(mine, SCALES)
        cc, wc = coverage(mine, found)
        print(f"  {st:<26}{len(mine):>7} {ct:>7.3f} ({wt:.3f}) /{cc:>6.3f} ({wc:.3f})")
    ct, wt = coverage(scored, SCALES)
    cc, wc = coverage(scored, found)
    print(f"  {'all':<26}{len(scored):>7} {ct:>7.3f} ({wt:.3f}) /{cc:>6.3f} ({wc:.3f})")
    for d, dim in enumerate(DIMS):
        groups: dict[str, list[Row]] = defaultdict(list)
        for r in scored:
            groups[r.keys[d]].append(r)
        print(f"\nby {dim}: coverage as told (median half-width) / calibrated")
        for key, rs in groups.items():
            ct, wt = coverage(rs, SCALES)
            cc, wc = coverage(rs, found)
            print(f"  {key:<28}{ct:>7.3f} ({wt:.3f}) /{cc:>6.3f} ({wc:.3f})")
    print()
    for fit in ("fitted", "early fit"):  # settled (60 intervals or more), or early
        fitted = [r for r in scored if r.terms.state.startswith(fit)]
        for sensor in sorted({r.keys[DIMS.index("sensor")] for r in fitted}):
            mine = [r for r in fitted if r.keys[DIMS.index("sensor")] == sensor]
            ct, wt = coverage(mine, SCALES)
            cc, wc = coverage(mine, found)
            print(f"{fit}, sensor {sensor}: {len(mine)} requests, coverage as told {ct:.3f} "
                  f"(median half-width {wt:.3f}), calibrated {cc:.3f} ({wc:.3f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
