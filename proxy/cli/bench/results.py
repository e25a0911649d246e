"""What one benchmark request measured, and the model x category summary of many.

Pure: no sockets, no files. `summarize` turns `RequestResult`s into summary rows (plain
dicts, the rows of summary.json); the files, the table and the report all read those rows,
so their numbers are the same numbers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

STATUS_OK = "ok"
STATUS_ERROR = "error"


@dataclass(frozen=True)
class RequestResult:
    """One measured request. Units are in the names; `None` where not known.

    `joules` and friends come from the proxy's own `energy` object (for a failed request
    the proxy may still have measured it: kept, but never in the means). `duration_s`,
    `ttft_s` and `tpot_s` are measured here, on the client, from sending the request.
    """

    model: str
    category: str
    prompt_id: str
    repetition: int  # 0-based
    status: str  # STATUS_OK or STATUS_ERROR
    error: str = ""  # why it failed ("" when it did not)
    http_status: int | None = None
    joules: float | None = None
    dynamic_joules: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    duration_s: float | None = None  # client side: request sent -> stream finished
    ttft_s: float | None = None  # request sent -> first generated text
    tpot_s: float | None = None  # mean time per output token after the first
    co2eq_g: float | None = None
    method: str = ""  # the proxy's x-energy-method
    output_sha256: str = ""  # of the generated text, to check that outputs did not change
    request_id: str = ""
    started_unix_s: float | None = None  # wall clock, for ordering and joins only
    concurrency: int = 1  # the client concurrency it ran under

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RequestResult:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


RESULT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(RequestResult))
_INT_FIELDS = frozenset(
    {"repetition", "http_status", "prompt_tokens", "completion_tokens", "concurrency"}
)
_FLOAT_FIELDS = frozenset(
    {
        "joules",
        "dynamic_joules",
        "duration_s",
        "ttft_s",
        "tpot_s",
        "co2eq_g",
        "started_unix_s",
    }
)


def to_csv_row(r: RequestResult) -> dict[str, str]:
    """Strings for csv.DictWriter: None is empty, floats are exact (repr)."""
    out: dict[str, str] = {}
    for k, v in asdict(r).items():
        out[k] = "" if v is None else repr(v) if isinstance(v, float) else str(v)
    return out


def from_csv_row(row: Mapping[str, str]) -> RequestResult:
    """The inverse of `to_csv_row`."""
    d: dict[str, Any] = {}
    for k in RESULT_FIELDS:
        raw = row.get(k, "")
        if k in _INT_FIELDS:
            d[k] = int(raw) if raw != "" else None
        elif k in _FLOAT_FIELDS:
            d[k] = float(raw) if raw != "" else None
        else:
            d[k] = raw
    if d["repetition"] is None:
        d["repetition"] = 0
    if d["concurrency"] is None:
        d["concurrency"] = 1
    return RequestResult(**d)


# -- statistics ----------------------------------------------------------------------------

# Two-sided 95% quantiles of Student's t, t(0.975, df), for df = 1..30.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_T975_LARGE = ((40, 2.021), (60, 2.000), (120, 1.980))


def t975(df: int) -> float:
    """t(0.975, df); between tabulated degrees of freedom the smaller df's (wider) value."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    value = _T975[-1]
    for limit, t in _T975_LARGE:
        if df >= limit:
            value = t
    return value if df < 1000 else 1.960


def mean(xs: Sequence[float]) -> float | None:
    return math.fsum(xs) / len(xs) if xs else None


def stdev(xs: Sequence[float]) -> float | None:
    """Sample standard deviation (n - 1); None below two values."""
    return statistics.stdev(xs) if len(xs) >= 2 else None


def ci95_half_width(xs: Sequence[float]) -> float | None:
    """Half-width of the 95% confidence interval of the mean of `xs` (Student t)."""
    s = stdev(xs)
    if s is None:
        return None
    return t975(len(xs) - 1) * s / math.sqrt(len(xs))


def percentile(xs: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not xs:
        return None
    ordered = sorted(xs)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


# -- summary -------------------------------------------------------------------------------

SUMMARY_FIELDS: tuple[str, ...] = (
    "model",
    "category",
    "count",  # successful requests (the means are over these)
    "failures",
    "mean_joules",
    "stdev_joules",  # across the successful requests
    "ci95_joules",  # half-width, from the spread between repetitions' means
    "joules_per_token",  # sum of joules / sum of completion tokens
    "mean_dynamic_joules",
    "mean_co2eq_g",
    "tokens_per_s",  # sum of completion tokens / sum of request durations
    "mean_prompt_tokens",
    "mean_completion_tokens",
    "mean_duration_s",
    "p90_ttft_s",
    "mean_ttft_s",
    "mean_tpot_s",
    "methods",
)


def summarize(
    results: Iterable[RequestResult],
    *,
    models: Sequence[str] = (),
    categories: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """One row per model x category, in the order of `models` and `categories` (then in
    order of appearance). A cell where every request failed has `count` 0 and null means,
    so failures show; cells with no request at all are left out.
    """
    cells: dict[tuple[str, str], list[RequestResult]] = {}
    for r in results:
        cells.setdefault((r.model, r.category), []).append(r)
    model_order = {m: i for i, m in enumerate(dict.fromkeys([*models, *(k[0] for k in cells)]))}
    cat_order = {c: i for i, c in enumerate(dict.fromkeys([*categories, *(k[1] for k in cells)]))}
    keys = sorted(cells, key=lambda k: (model_order[k[0]], cat_order[k[1]]))
    return [summary_row(model, category, cells[(model, category)]) for model, category in keys]


def summary_row(model: str, category: str, rs: Sequence[RequestResult]) -> dict[str, Any]:
    ok = [r for r in rs if r.ok and r.joules is not None]
    failures = len(rs) - len(ok)
    joules = [r.joules for r in ok if r.joules is not None]
    by_rep: dict[int, list[float]] = {}
    for r in ok:
        if r.joules is not None:
            by_rep.setdefault(r.repetition, []).append(r.joules)
    rep_means = [m for m in (mean(v) for _, v in sorted(by_rep.items())) if m is not None]
    with_tokens = [r for r in ok if r.completion_tokens is not None and r.joules is not None]
    token_sum = sum(r.completion_tokens or 0 for r in with_tokens)
    timed = [r for r in with_tokens if r.duration_s is not None]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    return {
        "model": model,
        "category": category,
        "count": len(ok),
        "failures": failures,
        "mean_joules": mean(joules),
        "stdev_joules": stdev(joules),
        "ci95_joules": ci95_half_width(rep_means),
        "joules_per_token": _ratio(math.fsum(r.joules or 0.0 for r in with_tokens), token_sum),
        "mean_dynamic_joules": mean([r.dynamic_joules for r in ok if r.dynamic_joules is not None]),
        "mean_co2eq_g": mean([r.co2eq_g for r in ok if r.co2eq_g is not None]),
        "tokens_per_s": _ratio(
            sum(r.completion_tokens or 0 for r in timed),
            math.fsum(r.duration_s or 0.0 for r in timed),
        ),
        "mean_prompt_tokens": mean([r.prompt_tokens for r in ok if r.prompt_tokens is not None]),
        "mean_completion_tokens": mean(
            [r.completion_tokens for r in ok if r.completion_tokens is not None]
        ),
        "mean_duration_s": mean([r.duration_s for r in ok if r.duration_s is not None]),
        "p90_ttft_s": percentile(ttfts, 90),
        "mean_ttft_s": mean(ttfts),
        "mean_tpot_s": mean([r.tpot_s for r in ok if r.tpot_s is not None]),
        "methods": ",".join(sorted({r.method for r in ok if r.method})),
    }


def failure_reasons(results: Iterable[RequestResult]) -> list[dict[str, Any]]:
    """Failed requests grouped by model, category and error (first line, 200 characters)."""
    counts: dict[tuple[str, str, str], int] = {}
    for r in results:
        if not r.ok:
            key = (r.model, r.category, (r.error.splitlines() or [""])[0][:200])
            counts[key] = counts.get(key, 0) + 1
    return [{"model": m, "category": c, "error": e, "count": n} for (m, c, e), n in counts.items()]


Rater = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]

STATUS_COMPLETE = "complete"
STATUS_PARTIAL = "interrupted, partial"
STATUS_ABORTED = "aborted, partial"  # an unexpected error stopped the run


def build_summary(
    results: Sequence[RequestResult],
    model_runs: Sequence[Mapping[str, Any]],
    *,
    config: Mapping[str, Any],
    started_at: str,
    finished_at: str,
    interrupted: bool,
    aborted: str = "",  # the error that stopped the run, if one did
    models: Sequence[str] = (),
    categories: Sequence[str] = (),
    rate: Rater | None = None,
) -> dict[str, Any]:
    """The summary.json document. `rate` (`metering.ratings.score.rate`) adds `stars` and
    `wh_per_1000_queries` to every row (None where there is no measurement or too few)."""
    rows = summarize(results, models=models, categories=categories)
    if rate is not None:
        rows = rate(rows)
    return {
        "schema": "energy-proxy-bench/1",
        "status": STATUS_ABORTED if aborted else STATUS_PARTIAL if interrupted else STATUS_COMPLETE,
        "interrupted": interrupted or bool(aborted),
        "aborted": aborted or None,
        "started_at": started_at,
        "finished_at": finished_at,
        "config": dict(config),
        "totals": {
            "requests": len(results),
            "ok": sum(r.ok for r in results),
            "failures": sum(not r.ok for r in results),
        },
        "models": [dict(m) for m in model_runs],
        "rows": rows,
        "failure_reasons": failure_reasons(results),
    }
