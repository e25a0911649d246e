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

Defaults, chosen from the hardware the proxy measures (`embodied_for_host`; set your
host's own with `--embodied-kgco2eq`, `--lifespan-years`):
- TE = 318 kgCO2eq per GPU measured (NVML): Chien et al., "Reducing the Carbon Impact of
  Generative AI Inference (today and in 2035)", HotCarbon '23, estimate 318 kgCO2eq per
  GPU as one eighth of an 8 x A100 server's embodied emissions (GPU, CPU, DRAM, SSD, HDD
  and packaging): 2,544 kgCO2eq for such a server, 318 for a host with one GPU.
- A host where no GPU is measured (a CPU-only host, a `constant` or `trace` source): no
  figure fits it, so none is used (M = 0, SCI is the operational emissions alone) and
  the basis says so, rather than a GPU server's figure charged to a laptop.
- EL = 4 years: the lifespan in the SCI specification's own example, and the common
  replacement cycle of data-centre servers.
"""

from __future__ import annotations

from dataclasses import dataclass

SECONDS_PER_YEAR = 365 * 24 * 3600
J_PER_KWH = 3.6e6
EMBODIED_KGCO2EQ_PER_GPU = 318.0  # Chien et al., HotCarbon '23 (module docstring)
EMBODIED_PER_GPU_SOURCE = "Chien et al., HotCarbon '23"
DEFAULT_LIFESPAN_YEARS = 4.0


@dataclass(frozen=True, slots=True)
class Embodied:
    """The host's embodied emissions and lifespan, and what the figure is (`basis`)."""

    total_g: float
    lifespan_s: float
    basis: str = ""

    def __post_init__(self) -> None:
        if self.total_g < 0 or self.lifespan_s <= 0:
            raise ValueError("embodied emissions must be >= 0 and the lifespan > 0")

    @classmethod
    def from_kg_years(cls, total_kg: float, lifespan_years: float, basis: str = "") -> Embodied:
        return cls(total_kg * 1000.0, lifespan_years * SECONDS_PER_YEAR, basis)

    @property
    def kgco2eq(self) -> float:
        return self.total_g / 1000.0

    @property
    def lifespan_years(self) -> float:
        return self.lifespan_s / SECONDS_PER_YEAR

    def to_dict(self) -> dict[str, float | str]:
        """As `/readyz` shows it."""
        return {
            "kgco2eq": self.kgco2eq,
            "lifespan_years": self.lifespan_years,
            "basis": self.basis,
        }


def embodied_for_host(
    gpus_measured: int, configured_kg: float | None, lifespan_years: float
) -> Embodied:
    """The embodied figure in use: the configured one, else EMBODIED_KGCO2EQ_PER_GPU per
    GPU the proxy measures, else none (M = 0), each with its basis in words."""
    years = f"over {lifespan_years:g} years"
    if configured_kg is not None:
        basis = f"{configured_kg:g} kgCO2eq {years}, configured (--embodied-kgco2eq)"
        return Embodied.from_kg_years(configured_kg, lifespan_years, basis)
    if gpus_measured > 0:
        kg = EMBODIED_KGCO2EQ_PER_GPU * gpus_measured
        basis = (
            f"{kg:g} kgCO2eq {years}: {gpus_measured} GPU{'s' if gpus_measured > 1 else ''} x "
            f"{EMBODIED_KGCO2EQ_PER_GPU:g} kg ({EMBODIED_PER_GPU_SOURCE}), the default for "
            "a GPU host (--embodied-kgco2eq sets yours)"
        )
        return Embodied.from_kg_years(kg, lifespan_years, basis)
    basis = (
        "none: no default fits a host without a measured GPU, so SCI here is the operational "
        "emissions alone (--embodied-kgco2eq sets your host's)"
    )
    return Embodied.from_kg_years(0.0, lifespan_years, basis)


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
