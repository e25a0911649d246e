"""Grid carbon intensity: the figure, and where it comes from. Read on the request path:
must not block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Intensity:
    """Grid carbon intensity, gCO2eq/kWh, and where the figure came from."""

    g_per_kwh: float
    source: str  # static | electricitymaps | cached | fallback
    zone: str = ""
    age_s: float | None = None  # seconds since the figure was fetched (live sources only)

    def to_dict(self) -> dict[str, Any]:
        """As `/readyz` and the live events show it (no zone: null)."""
        return {
            "g_per_kwh": self.g_per_kwh,
            "source": self.source,
            "zone": self.zone or None,
            "age_s": self.age_s,
        }


class IntensityProvider(Protocol):
    def current(self) -> Intensity:
        """The intensity to use now (a cached value; never does I/O)."""
        ...


@runtime_checkable
class RefreshingIntensity(Protocol):
    """A provider that keeps its figure fresh in the background (Electricity Maps)."""

    def current(self) -> Intensity: ...

    async def run(self) -> None:
        """Refresh until cancelled; the app starts it at start-up and cancels it at shutdown."""
        ...


class StaticIntensity:
    """A fixed figure from config (`--carbon-intensity`), reported as source `static`."""

    def __init__(self, g_per_kwh: float, zone: str = "") -> None:
        if g_per_kwh < 0:
            raise ValueError("carbon intensity must be >= 0 gCO2eq/kWh")
        self._intensity = Intensity(g_per_kwh, "static", zone)

    def current(self) -> Intensity:
        return self._intensity
