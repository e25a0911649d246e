"""Software Carbon Intensity per request (Green Software Foundation, SCI spec 1.1). Pure.

    SCI = (E x I + M) / R          R = one request
    E   = energy attributed to the request, kWh, times the facility's PUE
    I   = grid carbon intensity, gCO2eq/kWh
    M   = TE x (TiR / EL) x (RR / ToR)

TE is the embodied emissions of the host, EL its expected lifespan. For a request, the
time-share TiR/EL and the resource-share RR/ToR come from how it shared the hardware:
RR/ToR is the fraction of the host's GPUs its backend runs on (1 on a host without
GPUs), and TiR is the request's *share* of the seconds that hardware was in use,
split among concurrent requests exactly as energy is (the ledger's "time" channel: two
requests side by side for one second are charged half a second each). So the embodied
emissions of busy hardware are shared out in full, and those of idle hardware (no request
in flight) are not charged to any request, as idle energy is not.

Defaults (change them for your host, `--embodied-kgco2eq`, `--lifespan-years`):
- TE = 2,544 kgCO2eq: an 8 x A100 GPU server; Chien et al., "Reducing the Carbon Impact
  of Generative AI Inference (today and in 2035)", HotCarbon '23, estimate 318 kgCO2eq
  per GPU as one eighth of such a server's embodied emissions (GPU, CPU, DRAM, SSD, HDD
  and packaging).
- EL = 4 years: the lifespan in the SCI specification's own example, and the common
  replacement cycle of data-centre servers.
"""

from __future__ import annotations

from dataclasses import dataclass

SECONDS_PER_YEAR = 365 * 24 * 3600
J_PER_KWH = 3.6e6
DEFAULT_EMBODIED_KGCO2EQ = 2544.0
DEFAULT_LIFESPAN_YEARS = 4.0


@dataclass(frozen=True, slots=True)
class Embodied:
    """The host's embodied emissions and lifespan."""

    total_g: float
    lifespan_s: float

    def __post_init__(self) -> None:
        if self.total_g < 0 or self.lifespan_s <= 0:
            raise ValueError("embodied emissions must be >= 0 and the lifespan > 0")

    @classmethod
    def from_kg_years(cls, total_kg: float, lifespan_years: float) -> Embodied:
        return cls(total_kg * 1000.0, lifespan_years * SECONDS_PER_YEAR)


def embodied_g(
    embodied: Embodied, time_reserved_s: float, resources_reserved: float, resources_total: float
) -> float:
    """M = TE x (TiR / EL) x (RR / ToR), grams CO2eq."""
    if resources_total <= 0:
        raise ValueError("total resources must be > 0")
    return (
        embodied.total_g
        * (time_reserved_s / embodied.lifespan_s)
        * (resources_reserved / resources_total)
    )


def operational_g(energy_j: float, intensity_g_per_kwh: float, pue: float = 1.0) -> float:
    """O = E x I: grams CO2eq, with E in kWh times the facility's PUE."""
    return energy_j * pue / J_PER_KWH * intensity_g_per_kwh


def sci_g(operational_g: float, embodied_g: float, functional_units: float = 1.0) -> float:
    """SCI = (O + M) / R, grams CO2eq per functional unit (here: one request)."""
    if functional_units <= 0:
        raise ValueError("R must be > 0")
    return (operational_g + embodied_g) / functional_units
