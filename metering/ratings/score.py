"""Energy Score star ratings, the AI Energy Score method. Pure.

Method: the AI Energy Score project (Hugging Face, Salesforce, Cohere and Carnegie Mellon
University; Luccioni, Gamazaychikov, Strubell, Hooker, Jernite, Mitchell, Wu, 2025;
https://huggingface.co/AIEnergyScore, documentation and FAQ at
https://huggingface.github.io/AIEnergyScore/). Per task, each rated model's energy in
watt-hours per 1,000 queries; "the GPU energy range for a specific task" is divided "into
five equal sections (20% intervals)", and a model's stars are the section its energy falls
in: the lowest fifth of the range 5 stars, the highest 1. Ratings are relative: they change
when models join or leave the comparison, while the Wh figure does not.

Here a task is a prompt category, and the energy is what the proxy measured: mean joules
per request over successful requests (all sources summed, see docs/INTERFACE.md), on the one
host this proxy meters. So stars compare models served on the same hardware, as the AI
Energy Score compares models on one reference GPU.

Choices where the published method says nothing:
- A value exactly on the edge between two bands gets the better band (more stars): the
  bands are [min, min+w], (min+w, min+2w], ..., (min+4w, max] with w = (max-min)/5. Values
  within `EDGE_TOLERANCE` of the band width of an edge count as on it, so decimal inputs
  such as 0.1 ... 0.6 are not pushed across an edge by binary floating-point rounding.
- Ties get equal stars (they fall in the same band).
- One rated model in a category, or all rated models equal: there is no range to cut; every
  value equals the minimum, which lies in the lowest (best) band, so each gets 5 stars. This
  is the same rule as above, not a special case: no rated model uses more energy than it.
- No rating (None) for a model and category with fewer than `MIN_REQUESTS_FOR_RATING`
  successful requests: a mean of a handful of requests is too noisy to rank. Such rows do
  not take part in the category's range either, so they cannot move other models' stars.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Final

J_PER_WH: Final = 3600.0
QUERIES_PER_RATING_UNIT: Final = 1000  # the AI Energy Score reports Wh per 1,000 queries
BANDS: Final = 5  # stars 5 (lowest energy) .. 1 (highest)
MIN_REQUESTS_FOR_RATING: Final = 20
EDGE_TOLERANCE: Final = 1e-9  # as a fraction of one band's width


def wh_per_1000_queries(mean_joules_per_query: float) -> float:
    """Mean joules per query -> watt-hours per 1,000 queries: J/query x 1000 / (3600 J/Wh).

    E.g. 36 J per query is 10 Wh per 1,000 queries.
    """
    if not math.isfinite(mean_joules_per_query) or mean_joules_per_query < 0:
        raise ValueError(f"energy must be finite and >= 0 J, got {mean_joules_per_query!r}")
    return mean_joules_per_query * QUERIES_PER_RATING_UNIT / J_PER_WH


def star_bands(values_wh: Mapping[str, float]) -> dict[str, int]:
    """Stars 1-5 for each key (a model) from its energy (Wh per 1,000 queries), cutting the
    range [min, max] of the given values into five equal bands; lowest band 5 stars. Edges
    go to the better band; a single value or all-equal values get 5 (module docstring).
    An empty mapping gives an empty dict."""
    for key, value in values_wh.items():
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"energy of {key!r} must be finite and >= 0 Wh, got {value!r}")
    if not values_wh:
        return {}
    lo, hi = min(values_wh.values()), max(values_wh.values())
    width = (hi - lo) / BANDS
    return {key: _stars(value, lo, width) for key, value in values_wh.items()}


def _stars(value: float, lo: float, width: float) -> int:
    if width <= 0:
        return BANDS
    # Position in band widths above the minimum: band k (1-based from the bottom) is
    # (k-1, k], plus 0 in band 1; snap to an edge within the tolerance first.
    position = (value - lo) / width
    band = max(1, math.ceil(position - EDGE_TOLERANCE))
    return BANDS + 1 - min(band, BANDS)


def rate(
    summary_rows: Iterable[Mapping[str, Any]], min_count: int = MIN_REQUESTS_FOR_RATING
) -> list[dict[str, Any]]:
    """Star ratings for rows shaped like `/v1/energy/summary`'s ({"model", "category",
    "count", "mean_joules", ...}): copies of the rows, in their order, with two keys added.

    - `wh_per_1000_queries`: from `mean_joules`, for every row that has it (None if not);
      a measurement, shown even where there is no rating.
    - `stars`: 1-5, rated per category among the rows with `count >= min_count` and a
      `mean_joules`; None for the others. One such model in a category is enough (5 stars).

    Each (model, category) should appear once, as in the summary; a repeated pair is
    refused, since it would take part in the range twice.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    out = [dict(row) for row in summary_rows]
    eligible: dict[str, dict[str, float]] = {}
    seen: set[tuple[str, str]] = set()
    for row in out:
        model, category = str(row["model"]), str(row["category"])
        if (model, category) in seen:
            raise ValueError(f"model {model!r} appears twice in category {category!r}")
        seen.add((model, category))
        mean_j = row.get("mean_joules")
        row["wh_per_1000_queries"] = None if mean_j is None else wh_per_1000_queries(mean_j)
        if mean_j is not None and int(row["count"]) >= min_count:
            eligible.setdefault(category, {})[model] = row["wh_per_1000_queries"]
    stars = {category: star_bands(values) for category, values in eligible.items()}
    for row in out:
        row["stars"] = stars.get(str(row["category"]), {}).get(str(row["model"]))
    return out
