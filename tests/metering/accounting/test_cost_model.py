"""The cost model's fit and the ledger's fixed-cost split, against figures made here."""

from __future__ import annotations

import random

import pytest

from metering.accounting.cost_model import (
    TRUST_EARLY_GAIN,
    Coefficients,
    CostFit,
    fit_coefficients,
)
from metering.accounting.ledger import Ledger


def intervals(truth: tuple[float, float, float], n: int, seed: int, noise: float = 0.03):
    rng = random.Random(seed)
    xs, ys = [], []
    for _ in range(n):
        busy = rng.uniform(0.05, 0.5)
        prompt = rng.choice([0.0, rng.uniform(0, 20_000)])
        decode = busy * rng.uniform(0, 64) * rng.uniform(50, 300)
        x = (busy, prompt, decode)
        y = sum(a * b for a, b in zip(x, truth, strict=True))
        xs.append(x)
        ys.append(y * (1.0 + rng.gauss(0.0, noise)))
    return xs, ys


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scale", [(0.25, 4.0, 1.0), (1.0, 1.0, 1.0), (4.0, 0.25, 2.0)])
def test_the_fit_finds_coefficients_it_was_not_told(seed: int, scale) -> None:
    # A host unlike the defaults: fixed and prefill costs from a quarter to four times.
    truth = (280.0 * scale[0], 0.005 * scale[1], 0.005 * scale[2])
    xs, ys = intervals(truth, 2000, seed)
    theta, band = fit_coefficients(xs, ys, Coefficients().as_tuple())
    assert theta[0] == pytest.approx(truth[0], rel=0.1)
    assert theta[1] == pytest.approx(truth[1], rel=0.1)
    assert band < 0.1  # 3 % noise: the model explains the intervals


def test_outliers_do_not_drag_the_fit() -> None:
    truth = (150.0, 0.008, 0.004)
    xs, ys = intervals(truth, 600, 1, noise=0.01)
    for i in range(0, 600, 20):  # 5 % of the intervals: a sensor glitch, 10x the energy
        ys[i] *= 10.0
    theta, _ = fit_coefficients(xs, ys, Coefficients().as_tuple())
    assert theta[0] == pytest.approx(150.0, rel=0.1)
    assert theta[1] == pytest.approx(0.008, rel=0.1)


def test_no_coefficient_goes_negative_and_missing_work_keeps_its_default() -> None:
    # Intervals with no prompt work at all: c_prefill cannot be told, the default holds.
    xs = [(0.5, 0.0, d) for d in range(0, 4000, 40)]
    ys = [0.5 * 100.0 + 0.002 * d for _, _, d in xs]
    theta, _ = fit_coefficients(xs, ys, Coefficients().as_tuple())
    assert theta[1] == pytest.approx(Coefficients().prefill_j_per_token)
    assert all(t >= 0.0 for t in theta)
    # Energy that falls as the work grows: held at zero, not made negative.
    ys = [50.0 - 0.01 * d for _, _, d in xs]
    theta, _ = fit_coefficients(xs, [max(y, 0.0) for y in ys], Coefficients().as_tuple())
    assert all(t >= 0.0 for t in theta)


def test_work_is_spread_over_the_intervals_it_spans_and_the_fit_waits_for_it() -> None:
    fit = CostFit()
    for k in range(20):
        fit.measured(k * 0.5, (k + 1) * 0.5, 100.0, 0.5)
    fit.work(1.0, 3.0, prompt=4000.0)  # four intervals, 1,000 tokens each
    fit.work(9.75, 10.25, decode=100.0)  # half in the last interval, half in the open one
    got = {iv.t0_s: iv.prompt_tokens for iv in fit._intervals if iv.prompt_tokens}
    assert got == {1.0: 1000.0, 1.5: 1000.0, 2.0: 1000.0, 2.5: 1000.0}
    assert fit._intervals[-1].decode_tokens == pytest.approx(50.0)
    assert fit._open is not None and fit._open.decode_tokens == pytest.approx(50.0)
    # A request in flight since 0.0: no interval is complete, nothing is fitted.
    assert not fit.fit(complete_before_s=0.0, now_s=10.0)
    assert fit.fit(complete_before_s=10.0, now_s=10.0)
    assert fit.intervals_used == 20


def test_intervals_with_untracked_work_take_work_but_are_not_fitted() -> None:
    fit = CostFit()
    for k in range(20):
        # Untracked work ran in every other interval: its energy is not the work known.
        fit.measured(k * 0.5, (k + 1) * 0.5, 100.0, 0.5, clean=k % 2 == 0)
    fit.work(1.0, 2.0, prompt=2000.0)
    assert [iv.prompt_tokens for iv in fit._intervals][2:4] == [1000.0, 1000.0]
    rows = fit.rows(complete_before_s=10.0)
    assert rows is not None and len(rows[0]) == 10


def test_the_fixed_cost_is_shared_equally_by_the_runners_and_the_rest_by_weight() -> None:
    led = Ledger(["gpu"])
    ch = led.channels["gpu"]
    ch.fixed_w = 10.0
    led.record("gpu", 0.0, 0.0)
    a = led.start(0.0, eq=1.0)  # runs, no work of its own
    b = led.start(10.0, eq=1.0)  # runs, work worth as much as the fixed cost
    w = led.start(0.0, eq=0.0)  # held waiting
    led.record("gpu", 20.0, 1.0)
    (sa,), (sb,), (sw,) = led.finish(a), led.finish(b), led.finish(w)
    assert (sa.energy_j, sb.energy_j, sw.energy_j) == pytest.approx((5.0, 15.0, 0.0))
    assert ch.runners == 0.0 and ch.members == 0


def fitted(truth: tuple[float, float, float], noise: float, n: int = 200) -> CostFit:
    fit = CostFit()
    fit.refit(intervals(truth, n, seed=4, noise=noise), now_s=1.0)
    return fit


def test_a_fit_clearly_better_than_the_defaults_is_trusted_though_noisy() -> None:
    # Fixed cost a quarter, prefill four times the defaults', through a sensor so coarse
    # that no model explains an interval to within 15 %: the fit still explains them far
    # better than the defaults do, and the split takes it.
    fit = fitted((70.0, 0.02, 0.005), noise=0.6)
    assert fit.band_rel > 0.15
    assert fit.defaults_band_rel is not None and fit.band_rel < 0.8 * fit.defaults_band_rel
    assert fit.trusted and fit.in_use == fit.coefficients
    assert fit.band_in_use == fit.band_rel


def test_a_noisy_fit_no_better_than_the_defaults_leaves_them_in_use() -> None:
    # The host is as the defaults say; noise alone makes the fit differ.
    fit = fitted(Coefficients().as_tuple(), noise=0.6)
    assert not fit.trusted and fit.in_use == fit.prior
    # The band told is the defaults' residual, the coefficients the split uses.
    assert fit.band_in_use == fit.defaults_band_rel


def test_a_few_intervals_are_trusted_only_when_they_rule_the_defaults_out() -> None:
    # A host a third dearer in fixed cost than the defaults, through a noisy sensor:
    # thirty intervals explain it a little better than the defaults do, not enough to
    # split by yet.
    near = fitted((380.0, 0.005, 0.005), noise=0.3, n=30)
    assert near.defaults_band_rel is not None
    assert near.band_rel > TRUST_EARLY_GAIN * near.defaults_band_rel
    assert not near.trusted and near.in_use == near.prior
    # Fixed cost four times, prefill a quarter of the defaults': ten intervals through the
    # same sensor leave the defaults explaining under half of each, and the split takes
    # the fit at once.
    far = fitted((1120.0, 0.00125, 0.005), noise=0.3, n=10)
    assert far.defaults_band_rel is not None
    assert far.band_rel <= TRUST_EARLY_GAIN * far.defaults_band_rel
    assert far.trusted and far.in_use == far.coefficients
    assert far.in_use.fixed_w == pytest.approx(1120.0, rel=0.15)


# --- what the data identify ----------------------------------------------------------------


def _fit_on(xs: list[tuple[float, float, float]], ys: list[float]) -> CostFit:
    fit = CostFit()
    fit.refit((xs, ys), now_s=1.0)
    return fit


def test_varied_work_identifies_every_coefficient_with_a_small_error() -> None:
    truth = (150.0, 0.008, 0.004)
    xs, ys = intervals(truth, 600, 3)
    fit = _fit_on(xs, ys)
    assert fit.identified == (True, True, True)
    for value, err, true in zip(fit.coefficients.as_tuple(), fit.std_errors, truth, strict=True):
        assert err is not None and 0.0 < err < 0.1 * true
        assert value == pytest.approx(true, abs=4 * err + 0.05 * true)


def test_steady_batches_leave_fixed_and_decode_unidentified_and_held_at_the_defaults() -> None:
    # Every interval runs the same batch: decoded tokens in proportion to busy seconds,
    # so any mix of fixed cost and decode cost explains them alike.
    rng = random.Random(4)
    truth = (279.0, 0.005, 0.005)
    xs, ys = [], []
    for _ in range(400):
        busy = rng.uniform(0.1, 0.5)
        x = (busy, rng.uniform(0, 8000), busy * 24 * 290.0)
        xs.append(x)
        ys.append(sum(a * b for a, b in zip(x, truth, strict=True)) * (1 + rng.gauss(0, 0.03)))
    fit = _fit_on(xs, ys)
    defaults = Coefficients()
    assert fit.identified == (False, True, False)
    assert fit.coefficients.fixed_w == defaults.fixed_w  # held, not shown as this host's
    assert fit.coefficients.decode_j_per_token == defaults.decode_j_per_token
    assert fit.coefficients.prefill_j_per_token == pytest.approx(0.005, rel=0.1)
    errors = fit.std_errors
    assert errors[0] is not None and errors[0] > 0.25 * defaults.fixed_w


def test_a_loose_fit_that_rules_the_default_out_is_kept() -> None:
    # Prefill is nearly free on this host: loosely measured, but clearly not the default.
    truth = (300.0, 0.0002, 0.005)
    xs, ys = intervals(truth, 300, 5, noise=0.2)
    fit = _fit_on(xs, ys)
    err = fit.std_errors[1]
    assert err is not None
    assert fit.identified[1] and fit.coefficients.prefill_j_per_token < 0.005 - 2 * err


def test_no_prompt_work_gives_no_error_and_keeps_the_default() -> None:
    xs = [(0.5, 0.0, float(d)) for d in range(0, 4000, 40)]
    ys = [0.5 * 100.0 + 0.002 * d for _, _, d in xs]
    fit = _fit_on(xs, ys)
    assert fit.std_errors[1] is None and not fit.identified[1]
    assert fit.coefficients.prefill_j_per_token == Coefficients().prefill_j_per_token


def _trusted_of_100(n: int, noise: float) -> int:
    """Of 100 fits of `n` intervals on a host just like the defaults, those trusted."""
    trusted = 0
    for seed in range(100):
        fit = CostFit()
        fit.refit(intervals(Coefficients().as_tuple(), n, seed=seed, noise=noise), now_s=1.0)
        trusted += fit.trusted
    return trusted


def test_a_few_noisy_intervals_on_a_host_like_the_defaults_rarely_replace_them() -> None:
    # Eight intervals through a sensor whose noise is 30 % of each: a fit of three
    # coefficients explains some of the noise too, which the early rule counts for.
    assert _trusted_of_100(8, noise=0.3) <= 10
    # Through a sensor a third as noisy, almost never.
    assert _trusted_of_100(8, noise=0.1) <= 2
