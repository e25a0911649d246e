"""A record as a row, in the column order both databases use. Pure.

Thirteen fields are labels (model, backend, category, method, endpoint, ...): few distinct
values, each stored once in a `labels` table and referred to by a small integer. The
proxy's id is stored as its 12 bytes, the finish time as integer milliseconds. Every other
figure is stored once, as it was told; nothing derived (SCI, per-token figures) is stored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from metering.store.records import RequestRecord, id_key, id_of

# The columns of the first compact schema (SQLite v3, PostgreSQL v1): the migrations that
# shipped with them name these, never the current list.
COLUMNS_FIRST = (
    "rid",
    "finished_ms",
    "model",
    "model_group",
    "backend",
    "category",
    "tenant",
    "status",
    "duration_s",
    "prompt_tokens",
    "completion_tokens",
    "tokens_source",
    "joules",
    "gpu_joules",
    "cpu_joules",
    "dynamic_joules",
    "method",
    "attribution",
    "intensity_g_per_kwh",
    "intensity_source",
    "intensity_zone",
    "intensity_age_s",
    "co2eq_g",
    "embodied_g",
    "client_request_id",
)
# Added by SQLite v4 / PostgreSQL v2: the uncertainty band and what the split rested on.
COLUMNS_V4 = (*COLUMNS_FIRST, "band_rel", "attribution_basis")
# Added by SQLite v5 / PostgreSQL v3: the API the request called (a label), and whether it
# shared the backend with work the proxy did not send (0/1, NULL: unknown).
COLUMNS_V5 = (*COLUMNS_V4, "endpoint", "shared_with_untracked")
# Added by SQLite v6 / PostgreSQL v4: what the embodied figure behind `embodied_g` is (a label).
COLUMNS_V6 = (*COLUMNS_V5, "embodied_basis")
# Added by SQLite v8 / PostgreSQL v6: the routing policy and why that backend (a label).
COLUMNS = (*COLUMNS_V6, "route")
LABEL_COLUMNS = frozenset(
    {
        "model",
        "model_group",
        "backend",
        "category",
        "tenant",
        "tokens_source",
        "method",
        "attribution",
        "intensity_source",
        "intensity_zone",
        "attribution_basis",
        "endpoint",
        "embodied_basis",
        "route",
    }
)
# Columns that hold a float the record cannot be without: a NULL there (SQLite stores a
# NaN as NULL) reads back as NaN.
_NAN_WHEN_NULL = frozenset(
    {"duration_s", "joules", "dynamic_joules", "intensity_g_per_kwh", "co2eq_g", "embodied_g"}
)
TENANT = COLUMNS.index("tenant")


def label_texts(r: RequestRecord) -> tuple[str, ...]:
    """The record's label values, in `COLUMNS` order."""
    return (
        r.model,
        r.group,
        r.backend,
        r.category,
        r.tenant,
        r.tokens_source,
        r.method,
        r.attribution,
        r.carbon_intensity_source,
        r.carbon_intensity_zone,
        r.attribution_basis,
        r.endpoint,
        r.embodied_basis,
        r.route,
    )


# The largest token count or status a record may hold: far beyond any request (the relay
# reads a backend's absurd usage as not said), far below what the stores' sums overflow at
# (SQLite's INTEGER, 2**63). A record beyond it is refused alone, never its batch.
MAX_STORED_COUNT = 2**40


def _count(x: object, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= MAX_STORED_COUNT:
        raise ValueError(f"{name} {x!r} is not a count from 0 to {MAX_STORED_COUNT}")
    return x


def _figure(x: object, name: str) -> float:
    """A float the store can sum: finite, or NaN (stored as NULL, read back as NaN)."""
    v = float(x)  # type: ignore[arg-type]
    if math.isinf(v) or abs(v) > 1e300:
        raise ValueError(f"{name} {x!r} is not a finite figure")
    return v


def encode(r: RequestRecord, label: Callable[[str], int]) -> tuple[object, ...]:
    """The row of `r`; `label` maps a label's text to its id. Raises TypeError/ValueError
    for a record that is not one (a data error: it is dropped, logged)."""
    if not isinstance(r, RequestRecord):
        raise TypeError(f"not a RequestRecord: {type(r).__name__}")
    return (
        id_key(r.request_id),
        round(float(r.finished_at) * 1000.0),
        label(r.model),
        label(r.group),
        label(r.backend),
        label(r.category),
        label(r.tenant),
        _count(r.status, "status"),
        _figure(r.duration_s, "duration_s"),
        None if r.prompt_tokens is None else _count(r.prompt_tokens, "prompt_tokens"),
        _count(r.completion_tokens, "completion_tokens"),
        label(r.tokens_source),
        _figure(r.joules, "joules"),
        None if r.gpu_joules is None else _figure(r.gpu_joules, "gpu_joules"),
        None if r.cpu_joules is None else _figure(r.cpu_joules, "cpu_joules"),
        _figure(r.dynamic_joules, "dynamic_joules"),
        label(r.method),
        label(r.attribution),
        _figure(r.carbon_intensity_g_per_kwh, "carbon_intensity_g_per_kwh"),
        label(r.carbon_intensity_source),
        label(r.carbon_intensity_zone),
        None if r.carbon_intensity_age_s is None else _figure(r.carbon_intensity_age_s, "age"),
        _figure(r.co2eq_g, "co2eq_g"),
        _figure(r.embodied_g, "embodied_g"),
        None if r.client_request_id is None else str(r.client_request_id),
        None if r.band_rel is None else _figure(r.band_rel, "band_rel"),
        label(r.attribution_basis),
        label(r.endpoint),
        _flag(r.shared_with_untracked),
        label(r.embodied_basis),
        label(r.route),
    )


def _num(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _truth(x: object) -> bool | None:
    return None if x is None else bool(x)


def _flag(x: bool | None) -> int | None:
    # A truth value as the integer both databases store (NULL: unknown).
    return None if x is None else int(bool(x))


def decode(row: Sequence[Any], text: Callable[[int], str]) -> RequestRecord:
    """The record of a stored row; `text` maps a label id to its text."""
    (
        rid,
        finished_ms,
        model,
        model_group,
        backend,
        category,
        tenant,
        status,
        duration_s,
        prompt_tokens,
        completion_tokens,
        tokens_source,
        joules,
        gpu_joules,
        cpu_joules,
        dynamic_joules,
        method,
        attribution,
        intensity,
        intensity_source,
        intensity_zone,
        intensity_age_s,
        co2eq_g,
        embodied_g,
        client_request_id,
        band_rel,
        attribution_basis,
        endpoint,
        shared_with_untracked,
        embodied_basis,
        route,
    ) = row
    model_text = text(model)
    group_text = text(model_group)
    return RequestRecord(
        request_id=id_of(rid),
        finished_at=int(finished_ms) / 1000.0,
        model=model_text,
        backend=text(backend),
        category=text(category),
        status=int(status),
        duration_s=_num(duration_s),
        prompt_tokens=None if prompt_tokens is None else int(prompt_tokens),
        completion_tokens=int(completion_tokens),
        tokens_source=text(tokens_source),
        joules=_num(joules),
        gpu_joules=None if gpu_joules is None else float(gpu_joules),
        cpu_joules=None if cpu_joules is None else float(cpu_joules),
        dynamic_joules=_num(dynamic_joules),
        method=text(method),
        carbon_intensity_g_per_kwh=_num(intensity),
        carbon_intensity_source=text(intensity_source),
        co2eq_g=_num(co2eq_g),
        embodied_g=_num(embodied_g),
        carbon_intensity_zone=text(intensity_zone),
        carbon_intensity_age_s=None if intensity_age_s is None else float(intensity_age_s),
        attribution=text(attribution),
        tenant=text(tenant),
        client_request_id=None if client_request_id is None else str(client_request_id),
        model_group="" if group_text == model_text else group_text,
        band_rel=None if band_rel is None else float(band_rel),
        attribution_basis=text(attribution_basis),
        endpoint=text(endpoint),
        shared_with_untracked=_truth(shared_with_untracked),
        embodied_basis=text(embodied_basis),
        route=text(route),
    )
