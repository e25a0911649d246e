"""Records for the request store's tests: reports built as the relay builds them."""

from __future__ import annotations

from typing import Any

from metering.accounting.report import EnergyReport, Tokens
from metering.carbon.intensity import Intensity
from metering.carbon.sci import sci_g
from metering.store import RequestRecord

STORE_LOG = "energy_proxy.store"


def rid(n: int) -> str:
    """A proxy-made id (what the store keys on), distinct for each `n`."""
    return f"req-{n:024x}"


def make_report(
    request_id: str,
    *,
    model: str = "m1",
    category: str = "code",
    joules: float = 10.0,
    completion_tokens: int = 5,
    prompt_tokens: int | None = 3,
    co2eq_g: float = 0.001,
    embodied_g: float = 0.0001,
    zone: str = "",
    age_s: float | None = None,
    cpu_j: float | None = None,
    attribution: str = "queue",
    client_request_id: str | None = None,
) -> EnergyReport:
    return EnergyReport(
        request_id=request_id,
        model=model,
        category=category,
        duration_s=0.5,
        tokens=Tokens(prompt_tokens, completion_tokens, "backend"),
        energy_j=joules,
        gpu_j=joules * 0.75,
        cpu_j=cpu_j,
        dynamic_j=joules / 2,
        method="constant",
        intensity=Intensity(500.0, "electricitymaps" if zone else "static", zone, age_s),
        co2eq_g=co2eq_g,
        embodied_g=embodied_g,
        sci_g=sci_g(co2eq_g, embodied_g),
        attribution=attribution,
        client_request_id=client_request_id,
    )


def make_record(
    request_id: str,
    *,
    status: int = 200,
    finished_at: float = 1000.0,
    backend: str = "fake",
    tenant: str = "",
    model_group: str = "",
    **kw: Any,
) -> RequestRecord:
    return RequestRecord.from_report(
        make_report(request_id, **kw),
        backend=backend,
        status=status,
        finished_at=finished_at,
        tenant=tenant,
        model_group=model_group,
    )
