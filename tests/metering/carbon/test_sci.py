"""SCI math on hand-computed examples, one from the specification itself."""

from __future__ import annotations

import pytest

from metering.accounting.ledger import Ledger
from metering.carbon.sci import (
    SECONDS_PER_YEAR,
    Embodied,
    embodied_for_host,
    embodied_g,
    operational_g,
    sci_g,
)


def test_specification_worked_example() -> None:
    # SCI spec 1.1, "Embodied emissions": 1000 kg over four years, reserved one hour,
    # "1000 * 1/(4*365*24) or around 28 g".
    emb = Embodied.from_kg_years(1000.0, 4.0)
    m = embodied_g(emb, time_reserved_s=3600.0, resources_reserved=1, resources_total=1)
    assert m == pytest.approx(1_000_000.0 / (4 * 365 * 24))
    assert m == pytest.approx(28.54, abs=0.01)  # "around 28 g"


def test_request_example_by_hand() -> None:
    # 36 J at PUE 1.2 on a 500 g/kWh grid; 2 s on 2 of the 8 GPUs of a 2,544 kg server.
    o = operational_g(36.0, 500.0, pue=1.2)
    assert o == pytest.approx(36.0 * 1.2 / 3.6e6 * 500.0)  # 0.006 g
    emb = embodied_for_host(8, None, 4.0)
    m = embodied_g(emb, 2.0, 2, 8)
    assert m == pytest.approx(2_544_000.0 * 2.0 / (4 * SECONDS_PER_YEAR) * 0.25)
    assert sci_g(o, m) == pytest.approx(0.006 + m)
    assert sci_g(o, m, functional_units=2) == pytest.approx((0.006 + m) / 2)


def test_readme_worked_example() -> None:
    # README "Carbon and SCI": 10 s alone on 2 of 8 GPUs, 150 kJ at 480 g/kWh, defaults.
    emb = embodied_for_host(8, None, 4.0)  # an 8-GPU host's default: 8 x 318 kg
    m = embodied_g(emb, 10.0, 2, 8)
    assert round(m, 4) == 0.0504
    o = operational_g(150_000.0, 480.0)
    assert o == pytest.approx(20.0)
    assert round(sci_g(o, m), 2) == 20.05


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        Embodied(-1.0, 10.0)
    with pytest.raises(ValueError):
        Embodied(1.0, 0.0)
    with pytest.raises(ValueError):
        embodied_g(Embodied(1.0, 1.0), 1.0, 1.0, 0.0)
    with pytest.raises(ValueError):
        sci_g(1.0, 1.0, 0.0)


def test_time_channel_splits_busy_seconds_like_energy() -> None:
    # Two requests overlap for 1 s of a 3 s busy period: each is charged its share of the
    # seconds, and together exactly the busy time (the idle second goes to nobody).
    led = Ledger(["time:host"])
    led.record("time:host", 0.0, 0.0)
    a = led.start()
    led.record("time:host", 1.0, 1.0)
    b = led.start()
    led.record("time:host", 2.0, 2.0)
    (sa,) = led.finish(a)
    led.record("time:host", 3.0, 3.0)
    (sb,) = led.finish(b)
    led.record("time:host", 4.0, 4.0)
    assert sa.energy_j == pytest.approx(1.5) and sb.energy_j == pytest.approx(1.5)
    assert led.channels["time:host"].idle_j == pytest.approx(1.0)


def test_the_default_embodied_figure_fits_the_hardware() -> None:
    """318 kg per measured GPU (Chien et al.); none on a host without a GPU, said so; a
    configured figure wins."""
    one = embodied_for_host(1, None, 4.0)
    assert one.kgco2eq == pytest.approx(318.0)
    assert "1 GPU x 318 kg" in one.basis and "Chien" in one.basis
    assert embodied_for_host(8, None, 4.0).kgco2eq == pytest.approx(2544.0)
    cpu = embodied_for_host(0, None, 4.0)
    assert cpu.kgco2eq == 0.0 and cpu.basis.startswith("none:")
    assert embodied_g(cpu, 3600.0, 1, 1) == 0.0
    mine = embodied_for_host(0, 1200.0, 5.0)
    assert mine.kgco2eq == pytest.approx(1200.0) and mine.lifespan_years == pytest.approx(5.0)
    assert "configured" in mine.basis
