"""The band's sources of error and how they combine (metering/accounting/band.py), and the
band the meter tells against the simulator's truth."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from metering.accounting.band import (
    AVERAGED,
    EXACT,
    FIT_FLOOR_LOG_SD,
    MAX_BAND_REL,
    PRIOR_LOG_SD,
    SAMPLED,
    SCALES,
    SENSOR_CLASSES,
    STATES,
    BandScale,
    BandTerms,
    band_j,
    band_rel,
    band_terms,
    coefficient_log_sds,
    sensor_class,
    state_of,
)
from tests.support.fairness import MIXES, requests_for
from tests.support.fakes.batching_engine import CostModel, EngineConfig
from tests.support.metered_sim import H100, run_metered


def _terms(**kw: float | bool | tuple[float, float, float]) -> BandTerms:
    args: dict[str, object] = {
        "joules": 10.0,
        "sensitivity_j": (0.0, 0.0, 0.0),
        "log_sds": (PRIOR_LOG_SD,) * 3,
        "own_work_j": 0.0,
        "period_s": 0.0,
        "duration_s": 2.0,
        "residual_rel": 0.0,
        "waited_s": 0.0,
        "queue_known": True,
    }
    args.update(kw)
    return band_terms(**args)  # type: ignore[arg-type]


def test_the_defaults_carry_the_prior_spread_and_a_fit_its_own_error() -> None:
    values = (280.0, 0.005, 0.005)
    errors = (28.0, 0.0005, None)
    assert coefficient_log_sds(False, values, errors, (True, True, True)) == (PRIOR_LOG_SD,) * 3
    fitted = coefficient_log_sds(True, values, errors, (True, False, True))
    assert fitted[0] == pytest.approx(math.hypot(0.1, FIT_FLOOR_LOG_SD))
    assert fitted[1] == PRIOR_LOG_SD  # not identified: held at the default, its spread too
    assert fitted[2] == PRIOR_LOG_SD  # no error known
    # A loose fit is never less sure than the prior.
    loose = coefficient_log_sds(True, values, (1000.0, 0.05, 0.05), (True, True, True))
    assert loose == (PRIOR_LOG_SD,) * 3


def test_each_source_turns_into_joules_of_its_own() -> None:
    t = _terms(sensitivity_j=(3.0, -4.0, 1.0), log_sds=(1.0, 1.0, 0.0))
    assert t.coefficients_j == pytest.approx(5.0)
    assert (t.resolution_j, t.own_work_j, t.residual_j, t.queue_j, t.crowd_j) == (0.0,) * 5
    # The sensor's resolution: half a period over the request's time, of its joules and of
    # its own work, in so far as others ran beside it (here half the energy of its time).
    shared = {"exposure_j": 20.0, "dynamic_j": 10.0}
    t = _terms(period_s=0.5, duration_s=1.0, own_work_j=8.0, **shared)
    assert (t.resolution_j, t.own_work_j) == pytest.approx((1.25, 1.0))
    short = _terms(period_s=0.5, duration_s=0.01, own_work_j=8.0, **shared)
    assert (short.resolution_j, short.own_work_j) == pytest.approx((2.5, 2.0))
    alone = _terms(period_s=0.5, duration_s=0.01, own_work_j=8.0, exposure_j=10.0, dynamic_j=10.0)
    assert (alone.resolution_j, alone.own_work_j) == (0.0, 0.0)
    assert _terms(residual_rel=0.2).residual_j == pytest.approx(2.0)


def test_the_queue_counts_only_while_the_capacity_is_unsure() -> None:
    sure = _terms(waited_s=1.0, exposure_j=50.0, dynamic_j=8.0)
    assert (sure.queue_j, sure.crowd_j) == (0.0, 0.0)
    unsure = _terms(waited_s=1.0, queue_known=False, exposure_j=50.0, dynamic_j=8.0)
    # Held waiting half its time: its running rate over that half, and the others' 42 J.
    assert unsure.queue_j == pytest.approx(10.0)
    assert unsure.crowd_j == pytest.approx(42.0)


def test_sources_add_in_quadrature_scaled_and_bounded() -> None:
    t = BandTerms(joules=10.0, coefficients_j=3.0, residual_j=4.0)
    ones = {state: BandScale() for state in STATES}
    assert band_j(t, BandScale()) == pytest.approx(5.0)
    assert band_rel(t, ones) == pytest.approx(0.5)
    # Each state has its own factors.
    mine = {**ones, t.state: BandScale(coefficients=2.0, residual=0.0)}
    assert band_rel(t, mine) == pytest.approx(0.6)
    other = replace(t, state=state_of(fitted=True, queue_known=False))
    assert band_rel(other, mine) == pytest.approx(0.5)
    # A request told nothing, or next to nothing, gets a bounded band.
    assert band_rel(BandTerms(joules=0.0, coefficients_j=1.0), ones) == MAX_BAND_REL
    assert band_rel(BandTerms(joules=1e-9, coefficients_j=1.0), ones) == MAX_BAND_REL


def test_the_state_names_the_fit_the_queue_and_the_sensor() -> None:
    fits = ((False, False), (True, True), (True, False))  # defaults, early fit, settled fit
    assert set(STATES) == {
        state_of(f, q, c, e) for f, e in fits for q in (False, True) for c in SENSOR_CLASSES
    }
    assert set(SCALES) == set(STATES)
    assert _terms(queue_known=False).state == "defaults, capacity unsure, exact counter"
    assert _terms(fitted=True, sensor=SAMPLED).state == "fitted, capacity known, power sampled"
    early = _terms(fitted=True, early=True, queue_known=False, sensor=AVERAGED)
    assert early.state == "early fit, capacity unsure, power averaged"
    assert _terms(early=True).state.startswith("defaults")  # no fit in use: no early one
    # An H100's NVML: a counter that moves every 100 ms and instant power samples; an
    # older GPU's: power readings that average the last second.
    assert sensor_class(0.1, 0.0) == SAMPLED
    assert sensor_class(0.1, 1.0) == AVERAGED
    assert sensor_class(0.0, 0.0) == EXACT


def test_energy_near_its_edges_is_a_short_requests_placement_error() -> None:
    # 40 J drawn while a 50 ms request ran, read by a sensor whose period is 100 ms: all
    # of it may have fallen on the wrong side of its start or end; over 2 s, 2 % of it.
    short = _terms(period_s=0.1, duration_s=0.05, exposure_j=40.0, dynamic_j=10.0)
    assert short.placement_j == pytest.approx(40.0)
    long = _terms(period_s=0.1, duration_s=2.0, exposure_j=40.0, dynamic_j=10.0)
    assert long.placement_j == pytest.approx(2.0)
    # A request alone is off by its neighbours in time too: its own energy counts.
    alone = _terms(period_s=0.1, duration_s=0.5, exposure_j=10.0, dynamic_j=10.0)
    assert alone.placement_j == pytest.approx(2.0) and alone.resolution_j == 0.0
    assert _terms(period_s=0.0, exposure_j=40.0).placement_j == 0.0  # an exact counter


def test_a_request_alone_is_told_a_narrow_band_and_one_in_a_crowd_a_wider_one() -> None:
    """Through the meter: a lone request's split cannot be wrong (all the energy is its
    own), so its band is only the sensor's; a long prompt beside decoders on a host whose
    costs are far from the defaults depends on the prices, and its band says so."""
    config = EngineConfig(max_running=8, cost=CostModel(decode_j_per_seq=0.005))
    alone = requests_for(MIXES["chat+rag+mid"], 1, 0.2, seed=1)[:1]
    out = run_metered(config, alone, "model", sensor=H100, gauges=True)
    (terms,) = out.terms.values()
    assert terms.coefficients_j == pytest.approx(0.0, abs=1e-6 * terms.joules)
    assert (terms.queue_j, terms.crowd_j) == (0.0, 0.0)
    crowd = requests_for(MIXES["chat+rag+mid"], 8, 40.0, seed=1)
    far = EngineConfig(max_running=64, cost=CostModel(fixed_j=0.25, prefill_j_per_token=0.02))
    out = run_metered(far, crowd, "model", sensor=H100, gauges=True)
    assert max(t.coefficients_j / t.joules for t in out.terms.values()) > 0.1
