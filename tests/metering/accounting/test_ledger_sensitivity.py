"""The ledger's sensitivities: how a request's dynamic joules move with each cost-model
coefficient's logarithm, against finite differences of the split itself."""

from __future__ import annotations

import math
import random

import pytest

from metering.accounting.ledger import Ledger

# One request's life: (time it joins, time it leaves, prompt tokens or None for decode,
# time its prefill ends and it decodes, or None)
Life = tuple[float, float, float, float | None]


def _split(
    lives: list[Life],
    fixed_w: float,
    c_prefill: float,
    c_decode: float,
    power_w: list[float],
) -> list[tuple[float, tuple[float, float, float]]]:
    """Run the ledger over 1-second readings at `power_w`; each request's dynamic joules
    and sensitivities."""
    ledger = Ledger(["gpu"])
    ch = ledger.channels["gpu"]
    ch.fixed_w = fixed_w
    events: list[tuple[float, int, str]] = []
    for i, (t0, t1, _, t_decode) in enumerate(lives):
        events.append((t0, i, "start"))
        events.append((t1, i, "end"))
        if t_decode is not None:
            events.append((t_decode, i, "decode"))
    events.sort()
    tickets = {}
    out: dict[int, tuple[float, tuple[float, float, float]]] = {}
    energy_j, t_s = 0.0, 0.0
    ledger.record("gpu", 0.0, 0.0)
    for t_ev, i, what in events:
        while t_s + 1.0 <= t_ev:  # the readings up to this event
            energy_j += power_w[int(t_s)]
            t_s += 1.0
            ledger.record("gpu", energy_j, t_s)
        if t_ev > t_s:
            energy_j += power_w[int(t_s)] * (t_ev - t_s)
            t_s = t_ev
            ledger.record("gpu", energy_j, t_s)
        prompt = lives[i][2]
        if what == "start":
            prefilling = lives[i][3] is not None
            weight = c_prefill * prompt if prefilling else c_decode
            tickets[i] = ledger.start(weight, eq=1.0, prefill=prefilling)
        elif what == "decode":
            ledger.reweigh(tickets[i], c_decode, 1.0, prefill=False)
        else:
            (share,) = ledger.finish(tickets[i])
            out[i] = (share.dynamic_j, share.sensitivity_j)
    return [out[i] for i in range(len(lives))]


@pytest.mark.parametrize("seed", range(8))
def test_sensitivities_match_finite_differences_of_the_split(seed: int) -> None:
    rng = random.Random(seed)
    lives: list[Life] = []
    for _ in range(rng.randint(2, 7)):
        t0 = rng.uniform(0.0, 8.0)
        t1 = t0 + rng.uniform(0.5, 6.0)
        prompt = rng.choice([30.0, 500.0, 4000.0])
        t_decode = rng.choice([None, t0 + (t1 - t0) * rng.uniform(0.05, 0.5)])
        lives.append((t0, t1, prompt, t_decode))
    power = [rng.uniform(50.0, 400.0) for _ in range(20)]
    coef = (rng.uniform(0.01, 1.0), 0.005 * rng.uniform(0.25, 4.0), 0.005 * rng.uniform(0.5, 4.0))
    base = _split(lives, *coef, power)
    h = 1e-4
    for k in range(3):
        up = list(coef)
        down = list(coef)
        up[k] *= math.exp(h)
        down[k] *= math.exp(-h)
        hi, lo = _split(lives, *up, power), _split(lives, *down, power)
        for i in range(len(lives)):
            numeric = (hi[i][0] - lo[i][0]) / (2.0 * h)
            assert base[i][1][k] == pytest.approx(numeric, rel=1e-3, abs=1e-6), (k, i)
    # Scaling every coefficient changes no split: the three sum to zero.
    for joules, sens in base:
        assert abs(sum(sens)) <= 1e-9 * max(1.0, joules)
    # And the split is not trivially insensitive: some request moves with some coefficient.
    assert max(abs(s) for _, sens in base for s in sens) > 0.0


def test_a_lone_request_is_insensitive_to_every_coefficient() -> None:
    (only,) = _split([(0.0, 5.0, 800.0, 1.0)], 0.3, 0.005, 0.005, [200.0] * 10)
    assert only[0] == pytest.approx(1000.0)
    assert all(abs(s) < 1e-9 for s in only[1])


def test_a_prompt_heavy_request_beside_decoders_gains_with_the_prefill_price() -> None:
    lives: list[Life] = [(0.0, 4.0, 8000.0, 2.0), (0.0, 4.0, 10.0, None), (0.0, 4.0, 10.0, None)]
    rag, chat, _ = _split(lives, 0.3, 0.005, 0.005, [300.0] * 10)
    assert rag[1][1] > 0.0 and chat[1][1] < 0.0  # dearer prompts: more for the long one
    assert rag[1][0] < 0.0  # a dearer fixed cost: closer to equal shares, less for it

