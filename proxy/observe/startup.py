"""What the proxy will measure and count with, said in one line: at `serve`'s start and in
`doctor`. Every figure that ends up in a request's energy and carbon, and whether each is
a measurement, an estimate or a fixed figure. Pure: the callers gather the parts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from proxy.settings import Settings

# What each power source's method means for the joules it gives.
METHOD_KINDS = {
    "nvml-counter": "measured: the GPU's energy counter",
    "nvml-power": "measured: the GPU's power samples",
    "rapl": "measured: the CPU's RAPL counters",
    "cpu-estimate": "an ESTIMATE from CPU utilisation, not a measurement",
    "constant": "a fixed figure, not measured",
    "trace": "replayed from a trace, not measured",
}


@dataclass(frozen=True, slots=True)
class SourceLine:
    name: str
    method: str
    hardware: str = ""


@dataclass(frozen=True, slots=True)
class Figures:
    """The parts of the line, each already in words."""

    sources: Sequence[SourceLine]
    intensity: str  # `describe_intensity`
    embodied: str  # the embodied figure's basis (carbon/sci.py)
    pue: float
    store: str  # a SQLite path, or a PostgreSQL URL without its password
    keys: int  # client keys configured (admin and tenants); 0: no key needed
    attribution: str
    request_log: bool | None = None  # None: not a server (doctor)


def describe_source(s: SourceLine) -> str:
    kind = METHOD_KINDS.get(s.method, s.method)
    hardware = f" {s.hardware}" if s.hardware and s.hardware != s.name else ""
    return f"{s.name}{hardware} ({s.method}, {kind})"


def describe_intensity(
    *,
    static_g_per_kwh: float,
    zone: str | None = None,
    lat: float | None = None,
    lon: float | None = None,
    refresh_s: float = 3600.0,
) -> str:
    """The carbon intensity's source: the static figure, or Electricity Maps for a zone or
    a place (with the static figure until its first answer)."""
    static = f"{static_g_per_kwh:g} gCO2eq/kWh"
    if zone is None and (lat is None or lon is None):
        return f"{static}, static (--carbon-intensity)"
    place = f"zone {zone}" if zone is not None else f"lat {lat:g}, lon {lon:g}"
    return (
        f"Electricity Maps, {place}, every {refresh_s:g} s ({static} until its first answer "
        "and while it cannot be reached)"
    )


def figures_of(
    settings: Settings,
    *,
    sources: Sequence[SourceLine],
    embodied: str,
    store: str,
    request_log: bool | None,
) -> Figures:
    """The figures of a proxy with these settings: the parts that come from elsewhere (the
    sources that read, the embodied basis for them, the store's name) given."""
    return Figures(
        sources=sources,
        intensity=describe_intensity(
            static_g_per_kwh=settings.carbon_intensity,
            zone=settings.carbon_zone,
            lat=settings.carbon_lat,
            lon=settings.carbon_lon,
            refresh_s=settings.carbon_refresh_s,
        ),
        embodied=embodied,
        pue=settings.pue,
        store=store,
        keys=len(settings.api_keys) + len(settings.keys),
        attribution=settings.attribution,
        request_log=request_log,
    )


def startup_line(f: Figures) -> str:
    """One line naming every figure in use."""
    sources = "; ".join(describe_source(s) for s in f.sources) or "none"
    keys = f"on ({f.keys} key{'s' if f.keys != 1 else ''})" if f.keys else "off (no key needed)"
    parts = [
        f"power {sources}",
        f"carbon intensity {f.intensity}",
        f"PUE {f.pue:g}",
        f"embodied {f.embodied}",
        f"store {f.store}",
        f"keys {keys}",
        f"attribution {f.attribution}",
    ]
    if f.request_log is not None:
        parts.append(f"request log {'on (one JSON line per request)' if f.request_log else 'off'}")
    return "energy-proxy: " + " | ".join(parts)
