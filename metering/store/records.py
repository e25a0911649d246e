"""One finished request as the store keeps it: ids, labels and numbers, each once.

The energy object a client was told is not stored as such: `RequestRecord.energy()` builds
it again from the fields through the same `EnergyReport` code, so it is the same object,
float for float (SCI and the per-token figures are derived by the same functions from the
same inputs). Records hold no prompt or completion text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from metering.accounting.report import DEFAULT_ENDPOINT, EnergyReport, Tokens
from metering.carbon.intensity import Intensity
from metering.carbon.sci import sci_g

ID_BYTES = 12  # a proxy id is "req-" + 24 hex digits: 12 random bytes
_PROXY_ID = re.compile(r"req-([0-9a-f]{24})")


class StoreError(Exception):
    """The request store cannot be opened or read; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One finished request. Units are in the names; `finished_at` is unix seconds.

    `request_id` is the proxy's own id (the store's key); `client_request_id` the client's
    own x-request-id, if it sent a usable one; `tenant` the API key's name ("" without
    keys). `status` is the HTTP status the client got; 499 means the client hung up.
    `model_group` is the model's name in summaries and ratings: the model itself when a
    backend lists it, "other" when not (as in the metrics' labels), so that clients asking
    for made-up model names cannot multiply the summary's rows.
    """

    request_id: str
    finished_at: float
    model: str
    backend: str
    category: str
    status: int
    duration_s: float
    prompt_tokens: int | None
    completion_tokens: int
    tokens_source: str
    joules: float
    gpu_joules: float | None
    cpu_joules: float | None
    dynamic_joules: float
    method: str
    carbon_intensity_g_per_kwh: float
    carbon_intensity_source: str
    co2eq_g: float
    embodied_g: float
    carbon_intensity_zone: str = ""
    carbon_intensity_age_s: float | None = None
    attribution: str = ""
    tenant: str = ""
    client_request_id: str | None = None
    model_group: str = ""  # "" means: the model itself
    band_rel: float | None = None  # the relative uncertainty of `joules` (an estimate)
    attribution_basis: str = ""  # what the split rested on
    endpoint: str = DEFAULT_ENDPOINT  # the API it called ("chat" for records from before)
    # It shared the backend with work the proxy did not send (None: no gauges told).
    shared_with_untracked: bool | None = None
    embodied_basis: str = ""  # what the embodied figure was ("" for records from before)
    route: str = ""  # the routing policy and why this backend, `policy/reason` ("": before)

    @classmethod
    def from_report(
        cls,
        report: EnergyReport,
        *,
        backend: str,
        status: int,
        finished_at: float,
        tenant: str = "",
        model_group: str = "",
        route: str = "",
    ) -> RequestRecord:
        """The record of `report` (which carries the client's own id, if any)."""
        return cls(
            request_id=report.request_id,
            finished_at=finished_at,
            model=report.model,
            backend=backend,
            category=report.category,
            status=status,
            duration_s=report.duration_s,
            prompt_tokens=report.tokens.prompt,
            completion_tokens=report.tokens.completion,
            tokens_source=report.tokens.source,
            joules=report.energy_j,
            gpu_joules=report.gpu_j,
            cpu_joules=report.cpu_j,
            dynamic_joules=report.dynamic_j,
            method=report.method,
            carbon_intensity_g_per_kwh=report.intensity.g_per_kwh,
            carbon_intensity_source=report.intensity.source,
            co2eq_g=report.co2eq_g,
            embodied_g=report.embodied_g,
            carbon_intensity_zone=report.intensity.zone,
            carbon_intensity_age_s=report.intensity.age_s,
            attribution=report.attribution,
            tenant=tenant,
            client_request_id=report.client_request_id,
            model_group="" if model_group == report.model else model_group,
            band_rel=report.band_rel,
            attribution_basis=report.basis,
            endpoint=report.endpoint,
            shared_with_untracked=report.shared_with_untracked,
            embodied_basis=report.embodied_basis,
            route=route,
        )

    @property
    def group(self) -> str:
        """The model's name in summaries and ratings."""
        return self.model_group or self.model

    def report(self) -> EnergyReport:
        return EnergyReport(
            request_id=self.request_id,
            model=self.model,
            category=self.category,
            duration_s=self.duration_s,
            tokens=Tokens(self.prompt_tokens, self.completion_tokens, self.tokens_source),
            energy_j=self.joules,
            gpu_j=self.gpu_joules,
            cpu_j=self.cpu_joules,
            dynamic_j=self.dynamic_joules,
            method=self.method,
            intensity=Intensity(
                self.carbon_intensity_g_per_kwh,
                self.carbon_intensity_source,
                self.carbon_intensity_zone,
                self.carbon_intensity_age_s,
            ),
            co2eq_g=self.co2eq_g,
            embodied_g=self.embodied_g,
            sci_g=sci_g(self.co2eq_g, self.embodied_g),
            attribution=self.attribution,
            client_request_id=self.client_request_id,
            band_rel=self.band_rel,
            basis=self.attribution_basis,
            endpoint=self.endpoint,
            shared_with_untracked=self.shared_with_untracked,
            embodied_basis=self.embodied_basis,
        )

    def energy(self) -> dict[str, Any]:
        """The energy object the client was told."""
        return self.report().to_dict()

    @property
    def rated_tokens(self) -> int:
        """The tokens a per-token figure divides by: completion tokens, or prompt tokens
        when it completed none (embeddings): `EnergyReport.joules_per_token`'s rule."""
        if self.completion_tokens > 0:
            return self.completion_tokens
        return self.prompt_tokens or 0


def id_key(request_id: str) -> bytes:
    """The stored key of an id: a proxy id's 12 random bytes (28 characters -> 12 bytes).

    Any other id (records written before the proxy made every id) is its UTF-8 bytes after
    a NUL byte, or two when one would make it 12 bytes long, so that no other id's key can
    equal a proxy id's. (Ids never start with NUL: HTTP headers cannot carry one.)"""
    m = _PROXY_ID.fullmatch(request_id)
    if m:
        return bytes.fromhex(m.group(1))
    text = request_id.encode()
    return (b"\x00\x00" if len(text) == ID_BYTES - 1 else b"\x00") + text


def id_of(key: bytes) -> str:
    """The id whose key is `key` (`id_key`'s inverse)."""
    key = bytes(key)
    if len(key) == ID_BYTES:
        return "req-" + key.hex()
    return key.lstrip(b"\x00").decode()
