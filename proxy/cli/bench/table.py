"""The summary's columns, formatted once for the terminal table and the HTML report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.table import Table


@dataclass(frozen=True)
class Column:
    key: str  # the summary row's field
    header: str
    numeric: bool = True
    terminal: bool = True  # also in the terminal table (the report has every column)
    short: str = ""  # the terminal's header, where it differs
    wide: bool = False  # in the terminal table only when it is wide enough


COLUMNS: tuple[Column, ...] = (
    Column("model", "model", numeric=False),
    Column("category", "category", numeric=False),
    Column("count", "ok"),
    Column("failures", "failed", short="fail"),
    Column("mean_joules", "J/request", short="J/req"),
    Column("stdev_joules", "stdev J", short="±sd J", wide=True),
    Column("ci95_joules", "95% CI ±J", terminal=False),
    Column("joules_per_token", "J/token", short="J/tok"),
    Column("mean_co2eq_g", "gCO2eq/request", short="gCO2eq"),
    Column("tokens_per_s", "tokens/s", short="tok/s"),
    Column("mean_duration_s", "mean latency s", terminal=False),
    Column("p90_ttft_s", "p90 TTFT s", short="TTFT90 s", wide=True),
    Column("mean_tpot_s", "mean TPOT s", terminal=False),
    Column("wh_per_1000_queries", "Wh/1000 queries", terminal=False),
    Column("stars", "stars"),
    Column("methods", "method", numeric=False, terminal=False),
)


WIDE_TERMINAL = 110  # columns


def columns_for(
    rows: Sequence[Mapping[str, Any]], *, terminal: bool, width: int | None = None
) -> list[Column]:
    """The columns to show: rating columns only once a rating was made; in a terminal
    narrower than WIDE_TERMINAL, the core ones only."""
    rated = any(r.get("stars") is not None for r in rows) or any(
        "wh_per_1000_queries" in r for r in rows
    )
    out = []
    for c in COLUMNS:
        if terminal and (not c.terminal or (c.wide and (width or 0) < WIDE_TERMINAL)):
            continue
        if c.key in ("stars", "wh_per_1000_queries") and not rated:
            continue
        out.append(c)
    return out


def fmt(value: Any) -> str:
    """A cell: 4 significant digits for floats, "-" for missing values."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_table(
    rows: Sequence[Mapping[str, Any]],
    *,
    title: str = "energy-proxy bench",
    width: int | None = WIDE_TERMINAL,
) -> Table:
    """Model x category: mean J per request, J/token, gCO2eq, tokens/s (rich); `width` is
    the terminal's, for the choice of columns."""
    table = Table(title=title)
    cols = columns_for(rows, terminal=True, width=width)
    for c in cols:
        if c.numeric:
            table.add_column(c.short or c.header, justify="right", no_wrap=True)
        else:  # names fold rather than vanish when the terminal is narrow
            longest = max([len(str(r.get(c.key) or "")) for r in rows], default=0)
            table.add_column(c.header, overflow="fold", min_width=min(longest, 10))
    for r in rows:
        cells = [fmt(r.get(c.key)) for c in cols]
        if r.get("failures"):
            i = [c.key for c in cols].index("failures")
            cells[i] = f"[red]{cells[i]}[/]"
        table.add_row(*cells)
    return table
