"""The energy object of one request: pure assembly from ledger shares, tokens and carbon.

This is the shape of docs/INTERFACE.md's `"energy"` object, the `x-energy-*` headers and the
final SSE event; all three are rendered from one `EnergyReport`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from metering.accounting.band import BandTerms
from metering.accounting.ledger import SourceShare
from metering.carbon.intensity import Intensity
from metering.carbon.sci import operational_g, sci_g

# The endpoint of a request that says none, and of every record stored before endpoints
# were: chat, completions and embeddings were not told apart then.
DEFAULT_ENDPOINT = "chat"


@dataclass(frozen=True, slots=True)
class Tokens:
    """Token counts; `prompt` is None when the backend reported none and the proxy
    could not count them (it counts streamed completion tokens only)."""

    prompt: int | None
    completion: int
    source: str  # "backend" (usage reported) or "proxy" (counted by the proxy)


@dataclass(frozen=True, slots=True)
class Timings:
    """What the backend itself said of one request's phases, seconds (vLLM's per-request
    metrics, llama.cpp's `timings`); None where it said nothing of a phase. `prefill_s`
    runs from its admission to its first token, `decode_s` from there to its last."""

    queue_s: float | None = None
    prefill_s: float | None = None
    decode_s: float | None = None


@dataclass(frozen=True, slots=True)
class EnergyReport:
    request_id: str
    model: str
    category: str
    duration_s: float
    tokens: Tokens
    energy_j: float
    gpu_j: float | None
    cpu_j: float | None
    dynamic_j: float
    method: str
    intensity: Intensity
    co2eq_g: float
    embodied_g: float
    sci_g: float
    attribution: str = ""  # how the energy was split among concurrent requests (the mode)
    client_request_id: str | None = None  # the client's own x-request-id, when usable
    # The relative uncertainty of `energy_j` (an estimate: meter.py, "uncertainty"), and
    # what the split rested on (the cost model and its state, the queue's source, timings).
    band_rel: float | None = None
    basis: str = ""
    # The API the request called (`chat`, `completions`, `embeddings`, `responses`,
    # `messages`, `audio`, `rerank`, `score`, `pooling`, ...): a label, as the proxy names it.
    endpoint: str = DEFAULT_ENDPOINT
    # Whether the backend ran work the proxy did not send while this request was in flight
    # (its own gauges showed more running than the proxy had sent): its share of the energy
    # was then split with that work. None: no gauges were read, so nobody can tell.
    shared_with_untracked: bool | None = None
    # The band's sources of error before scaling (band.py): for calibration, not shown.
    band_terms: BandTerms | None = None
    # What the embodied figure behind `embodied_g` is (carbon/sci.py, embodied_for_host).
    embodied_basis: str = ""

    @property
    def joules_low(self) -> float | None:
        return None if self.band_rel is None else self.energy_j * max(0.0, 1.0 - self.band_rel)

    @property
    def joules_high(self) -> float | None:
        return None if self.band_rel is None else self.energy_j * (1.0 + self.band_rel)

    @property
    def _per_token_n(self) -> int | None:
        return self.tokens.completion or self.tokens.prompt

    @property
    def joules_per_token(self) -> float | None:
        n = self._per_token_n
        return self.energy_j / n if n else None

    @property
    def sci_per_token_g(self) -> float | None:
        n = self._per_token_n
        return self.sci_g / n if n else None

    def to_dict(self) -> dict[str, Any]:
        """The `"energy"` object of docs/INTERFACE.md."""
        d: dict[str, Any] = {
            "request_id": self.request_id,
            "model": self.model,
            "endpoint": self.endpoint,
            "category": self.category,
            "joules": self.energy_j,
            "dynamic_joules": self.dynamic_j,
            "method": self.method,
            "duration_s": self.duration_s,
            "prompt_tokens": self.tokens.prompt,
            "completion_tokens": self.tokens.completion,
            "tokens_source": self.tokens.source,
            "joules_per_token": self.joules_per_token,
            "carbon_intensity_g_per_kwh": self.intensity.g_per_kwh,
            "carbon_intensity_source": self.intensity.source,
            "carbon_intensity_zone": self.intensity.zone or None,
            "carbon_intensity_age_s": self.intensity.age_s,
            "co2eq_g": self.co2eq_g,
            "embodied_g": self.embodied_g,
            "embodied_basis": self.embodied_basis or None,
            "sci_g": self.sci_g,
            "sci_per_token_g": self.sci_per_token_g,
            "shared_with_untracked": self.shared_with_untracked,
        }
        if self.attribution:
            d["attribution"] = self.attribution
        if self.band_rel is not None:
            d["joules_low"] = self.joules_low
            d["joules_high"] = self.joules_high
        if self.basis:
            d["attribution_basis"] = self.basis
        if self.client_request_id is not None:
            d["client_request_id"] = self.client_request_id
        if self.gpu_j is not None:
            d["gpu_joules"] = self.gpu_j
        if self.cpu_j is not None:
            d["cpu_joules"] = self.cpu_j
        return d

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The `x-energy-*`, carbon and category response headers."""
        h = [
            (b"x-energy-joules", _num(self.energy_j)),
            (b"x-energy-method", self.method.encode()),
            (b"x-carbon-intensity", _num(self.intensity.g_per_kwh)),
            (b"x-carbon-intensity-source", self.intensity.source.encode()),
            (b"x-co2eq-grams", _num(self.co2eq_g)),
            (b"x-sci-grams", _num(self.sci_g)),
            (b"x-prompt-category", self.category.encode()),
        ]
        if self.intensity.age_s is not None:
            h.append((b"x-carbon-intensity-age-s", _num(self.intensity.age_s)))
        if self.gpu_j is not None:
            h.append((b"x-energy-gpu-joules", _num(self.gpu_j)))
        if self.cpu_j is not None:
            h.append((b"x-energy-cpu-joules", _num(self.cpu_j)))
        return h


HEADER_SIGNIFICANT_DIGITS = 4


def header_number(x: float) -> str:
    """A header's value: `HEADER_SIGNIFICANT_DIGITS` significant digits in plain decimal
    (never an exponent), whole numbers from 1,000 up, trailing zeros dropped: 3.2233289 J
    is `3.223`, 0.000028412 g is `0.00002841`, 12,345.6 J is `12346`. The JSON body keeps
    the full float."""
    v = float(x)
    text = f"{v:.4g}"  # the common case: no exponent, trailing zeros already dropped
    if "e" not in text and (abs(v) < 1000.0 or "." not in text):
        return text
    if v == 0.0 or not math.isfinite(v):
        return "0" if v == 0.0 else repr(v)
    decimals = max(0, HEADER_SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(abs(v))))
    text = f"{v:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _num(x: float) -> bytes:
    return header_number(x).encode()


def build_report(
    *,
    request_id: str,
    model: str,
    category: str,
    duration_s: float,
    tokens: Tokens,
    shares: Iterable[SourceShare],
    domains: Mapping[str, str],
    methods: Iterable[str],
    intensity: Intensity,
    pue: float = 1.0,
    embodied_g: float = 0.0,
    attribution: str = "",
    client_request_id: str | None = None,
    band_rel: float | None = None,
    basis: str = "",
    endpoint: str = DEFAULT_ENDPOINT,
    shared_with_untracked: bool | None = None,
    band_terms: BandTerms | None = None,
    embodied_basis: str = "",
) -> EnergyReport:
    """Sum a request's per-source shares into its report.

    `domains` maps source name -> "gpu" | "cpu" | "system"; shares of other channels
    (the ledger's time channels) are not energy and are skipped. The GPU and CPU parts are
    present only when a source of that domain exists; `dynamic_j` is clamped at zero
    (an idle estimate above the real draw must not produce negative energy).
    """
    total_j = dynamic_j = 0.0
    gpu_j: float | None = None
    cpu_j: float | None = None
    for s in shares:
        dom = domains.get(s.name)
        if dom is None:
            continue
        total_j += s.energy_j
        dynamic_j += s.dynamic_j
        if dom == "gpu":
            gpu_j = (gpu_j or 0.0) + s.energy_j
        elif dom == "cpu":
            cpu_j = (cpu_j or 0.0) + s.energy_j
    co2 = operational_g(total_j, intensity.g_per_kwh, pue)
    return EnergyReport(
        request_id=request_id,
        model=model,
        category=category,
        duration_s=duration_s,
        tokens=tokens,
        energy_j=total_j,
        gpu_j=gpu_j,
        cpu_j=cpu_j,
        dynamic_j=max(0.0, dynamic_j),
        method=",".join(methods) or "none",  # every source of its group was degraded
        intensity=intensity,
        co2eq_g=co2,
        embodied_g=embodied_g,
        sci_g=sci_g(co2, embodied_g),
        attribution=attribution,
        client_request_id=client_request_id,
        band_rel=band_rel,
        basis=basis,
        endpoint=endpoint,
        shared_with_untracked=shared_with_untracked,
        band_terms=band_terms,
        embodied_basis=embodied_basis,
    )
