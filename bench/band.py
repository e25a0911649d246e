"""Does the band cover the truth? Calibrated on one half of the fairness scenarios,
scored on the other.

    python -m bench.band [--quick] [--per-kind 8] [--jobs N]

Every scenario of bench/fairness.py is served in the default mode; for each scored
request, how far the dynamic joules it was told are from the truth's (the engine's
Shapley share), over the joules it was told, beside the band it was told
(`joules_high / joules - 1`) and whether the fit or the defaults split it. Scenarios go
to the calibration half or the scoring half by a hash of their name. On the calibration
half, the factor by which each state's band must grow to cover 90 % of the requests (the
90th percentile of error / band); on the scoring half, the band's coverage as told and
as it would be with that factor, by each dimension, and its median half-width.

The factors printed are what `metering/meter.py` (BAND_SCALE_DEFAULTS, BAND_SCALE_FITTED)
should hold; once it does, they come out near 1 here. Nothing asserts.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import zlib
from collections import defaultdict

from bench.fairness import Scenario, outcome, scenarios

TARGET = 0.9
STATES = ("defaults", "fitted")
Row = tuple[float, float, bool]  # (error over joules, band, fitted)


def _bands(job: tuple[Scenario, int]) -> list[Row]:
    sc, per_kind = job
    return list(outcome(sc, "model", per_kind).bands.values())


def calibration_half(sc: Scenario) -> bool:
    return zlib.crc32(str(sc).encode()) % 2 == 0


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, int(q * len(s)))]


def factor(rows: list[Row], fitted: bool) -> float:
    """How much the band of requests in this state must grow to cover TARGET of them."""
    ratios = [e / b for e, b, f in rows if f == fitted and b > 0.0]
    return quantile(ratios, TARGET) if ratios else float("nan")


def covered(rows: list[Row], scale: dict[bool, float]) -> float:
    if not rows:
        return float("nan")
    hits = sum(1 for e, b, f in rows if e <= min(1.0, b * scale[f]))
    return hits / len(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--per-kind", type=int, default=8, help="requests of each kind per round")
    p.add_argument("--quick", action="store_true", help="a fixed sample of 160 scenarios")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes")
    args = p.parse_args()
    scs = scenarios(args.quick)
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        rows = dict(zip(scs, pool.map(_bands, [(sc, args.per_kind) for sc in scs], chunksize=8),
                        strict=True))  # fmt: skip
    calib = [r for sc, rs in rows.items() if calibration_half(sc) for r in rs]
    scored = {sc: rs for sc, rs in rows.items() if not calibration_half(sc)}
    k = {False: factor(calib, False), True: factor(calib, True)}
    print(f"{len(scs)} scenarios; calibration half {len(calib)} requests, "
          f"scoring half {sum(len(r) for r in scored.values())}")  # fmt: skip
    print(f"factor to cover {TARGET:.0%}: defaults x{k[False]:.2f}, fitted x{k[True]:.2f}")
    as_told = {False: 1.0, True: 1.0}
    calibrated = {f: (v if v == v else 1.0) for f, v in k.items()}  # NaN: no such requests
    every = [r for rs in scored.values() for r in rs]
    widths = [min(1.0, b * calibrated[f]) for _, b, f in every]
    print(f"scoring half: coverage as told {covered(every, as_told):.3f}, calibrated "
          f"{covered(every, calibrated):.3f}; median half-width {quantile(widths, 0.5):.3f}")
    for state, fitted in (("defaults", False), ("fitted", True)):
        mine = [r for r in every if r[2] == fitted]
        if mine:
            w = [min(1.0, b * calibrated[fitted]) for _, b, _ in mine]
            print(f"  {state:<9} {len(mine):>6} requests: coverage as told "
                  f"{covered(mine, as_told):.3f}, calibrated {covered(mine, calibrated):.3f}, "
                  f"median half-width {quantile(w, 0.5):.3f}")  # fmt: skip
    for dim in ("engine", "cost", "load", "mix", "sensor", "gauges", "warm"):
        groups: dict[str, list[Row]] = defaultdict(list)
        for sc, rs in scored.items():
            groups[str(getattr(sc, dim))].extend(rs)
        print(f"\nby {dim}: coverage as told / calibrated, median half-width calibrated")
        for key, rs in groups.items():
            w = [min(1.0, b * calibrated[f]) for _, b, f in rs]
            print(f"  {key:<28}{covered(rs, as_told):>8.3f} /{covered(rs, calibrated):>6.3f}"
                  f"{quantile(w, 0.5):>10.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
