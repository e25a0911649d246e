"""report.html: one self-contained file (inline SVG, inline CSS, no script, no server).

Pure: `render_report(summary)` reads the summary.json document and nothing else, so every
number in the report is one of summary.json's. Table cells and plot marks carry the exact
value in `data-value` (and the plots' marks `data-model`, `data-category`), so a test or a
reader's tool can check them against summary.json.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from proxy.cli.bench.table import columns_for, fmt

PALETTE = (
    "#1b9e77",
    "#d95f02",
    "#7570b3",
    "#e7298a",
    "#66a61e",
    "#e6ab02",
    "#a6761d",
    "#666666",
)
SVG_NS = "http://www.w3.org/2000/svg"

CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; max-width: 1100px; }
h1 { margin-bottom: 0.2rem; }
.status { font-weight: bold; }
.status.partial { color: #b00020; }
.estimate { color: #8a5a00; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; }
svg text { font-size: 12px; fill: #222; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.1rem 1rem; }
dt { font-weight: bold; }
"""


def render_report(summary: Mapping[str, Any]) -> str:
    rows: list[Mapping[str, Any]] = list(summary.get("rows", []))
    models = _unique([str(r["model"]) for r in rows])
    colors = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(models)}
    status = str(summary.get("status", ""))
    partial = bool(summary.get("interrupted"))
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>energy-proxy bench report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>energy-proxy bench</h1>",
        f'<p class="status{" partial" if partial else ""}" id="status">{escape(status)}</p>',
        _config(summary),
    ]
    methods = {m for r in rows for m in str(r.get("methods") or "").split(",") if m}
    if any("estimate" in m for m in methods):
        parts.append(
            '<p class="estimate">cpu-estimate: no power sensor was readable, so these joules '
            "are an ESTIMATE from CPU utilisation, not a measurement.</p>"
        )
    parts += [
        "<h2>Energy per request, by category</h2>",
        grouped_bars_svg(rows, colors),
        "<p>Whiskers: 95% confidence interval of the mean, from the spread between "
        "repetitions. &#215;: every request of that model and category failed.</p>",
        "<h2>Energy against latency</h2>",
        scatter_svg(rows, colors),
        "<h2>Summary</h2>",
        summary_table_html(rows),
        "<h2>Models</h2>",
        _models_table(summary.get("models", [])),
        _failures(summary.get("failure_reasons", [])),
        '<script type="application/json" id="summary-data">',
        # Data, not code: summary.json itself, for tools that read the report.
        json.dumps(summary, indent=None).replace("<", "\\u003c"),
        "</script>",
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def _unique(xs: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(xs))


def _config(summary: Mapping[str, Any]) -> str:
    cfg = dict(summary.get("config", {}))
    items = [("started", summary.get("started_at")), ("finished", summary.get("finished_at"))]
    items += list(cfg.items())
    body = "".join(
        f"<dt>{escape(str(k))}</dt><dd>{escape(_plain(v))}</dd>" for k, v in items if v is not None
    )
    return f'<dl id="config">{body}</dl>'


def _plain(v: Any) -> str:
    if isinstance(v, list | tuple):
        return ", ".join(str(x) for x in v)
    return fmt(v)


def _td(value: Any, numeric: bool, key: str) -> str:
    if numeric and value is not None and not isinstance(value, bool):
        return (
            f'<td class="num" data-field="{escape(key)}" data-value="{json.dumps(value)}">'
            f"{escape(fmt(value))}</td>"
        )
    cls = ' class="num"' if numeric else ""
    return f'<td{cls} data-field="{escape(key)}">{escape(fmt(value))}</td>'


def summary_table_html(rows: Sequence[Mapping[str, Any]]) -> str:
    cols = columns_for(rows, terminal=False)
    head = "".join(f'<th data-field="{escape(c.key)}">{escape(c.header)}</th>' for c in cols)
    body = "".join(
        "<tr>" + "".join(_td(r.get(c.key), c.numeric, c.key) for c in cols) + "</tr>" for r in rows
    )
    return f'<table id="summary-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


MODEL_COLUMNS = (
    ("model", "model"),
    ("idle_watts", "idle W"),
    ("idle_max_inflight", "in flight while idle"),
    ("warmup_requests", "warm-up"),
    ("warmup_failures", "warm-up failed"),
    ("requests", "requests"),
    ("failures", "failed"),
    ("wall_s", "wall s"),
    ("throughput_tokens_per_s", "tokens/s, all requests"),
)


def _models_table(models: Sequence[Mapping[str, Any]]) -> str:
    if not models:
        return "<p>No model finished its pass.</p>"
    head = "".join(f"<th>{escape(h)}</th>" for _, h in MODEL_COLUMNS)
    body = "".join(
        "<tr>" + "".join(_td(m.get(k), k != "model", k) for k, _ in MODEL_COLUMNS) + "</tr>"
        for m in models
    )
    return f'<table id="models-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _failures(reasons: Sequence[Mapping[str, Any]]) -> str:
    if not reasons:
        return ""
    items = "".join(
        f"<li>{escape(str(r.get('model')))} / {escape(str(r.get('category')))}: "
        f"{escape(str(r.get('count')))} &#215; {escape(str(r.get('error')))}</li>"
        for r in reasons
    )
    return f'<h2>Failures</h2><ul id="failures">{items}</ul>'


# -- plots ---------------------------------------------------------------------------------


def nice_ticks(top: float, n: int = 5) -> list[float]:
    """0 and round steps (1, 2 or 5 times a power of ten) up to at least `top`."""
    if not top > 0 or not math.isfinite(top):
        return [0.0, 1.0]
    raw = top / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    count = math.ceil(top / step - 1e-9)
    return [round(i * step, 12) for i in range(count + 1)]


def _svg_open(width: int, height: int, label: str, ident: str) -> str:
    return (
        f'<svg xmlns="{SVG_NS}" id="{ident}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">'
    )


def _legend(colors: Mapping[str, str], x: float, y: float) -> str:
    out = []
    for i, (model, color) in enumerate(colors.items()):
        yy = y + 16 * i
        out.append(
            f'<rect x="{x:.1f}" y="{yy - 10:.1f}" width="10" height="10" fill="{color}"/>'
            f'<text x="{x + 14:.1f}" y="{yy:.1f}">{escape(model)}</text>'
        )
    return '<g class="legend">' + "".join(out) + "</g>"


def _y_axis(ticks: Sequence[float], left: float, right: float, y_of: Any, title: str) -> str:
    out = []
    for t in ticks:
        y = y_of(t)
        out.append(
            f'<line x1="{left:.1f}" x2="{right:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>'
            f'<text x="{left - 6:.1f}" y="{y + 4:.1f}" text-anchor="end">{escape(fmt(t))}</text>'
        )
    mid = (y_of(ticks[0]) + y_of(ticks[-1])) / 2
    out.append(
        f'<text x="14" y="{mid:.1f}" transform="rotate(-90 14 {mid:.1f})" '
        f'text-anchor="middle">{escape(title)}</text>'
    )
    return "".join(out)


def grouped_bars_svg(
    rows: Sequence[Mapping[str, Any]], colors: Mapping[str, str], width: int = 1000
) -> str:
    """Mean J per request: a group per category, a bar per model, 95% CI whiskers."""
    height, left, right, top, bottom = 380, 70, 260, 20, 50
    categories = _unique([str(r["category"]) for r in rows])
    models = list(colors)
    measured = [r for r in rows if r.get("mean_joules") is not None]
    peak = max(
        [float(r["mean_joules"]) + float(r.get("ci95_joules") or 0.0) for r in measured],
        default=0.0,
    )
    ticks = nice_ticks(peak)
    plot_w, plot_h = width - left - right, height - top - bottom
    y0 = top + plot_h

    def y_of(v: float) -> float:
        return y0 - plot_h * v / ticks[-1]

    out = [_svg_open(width, height, "energy per request by category and model", "energy-bars")]
    out.append(_y_axis(ticks, left, left + plot_w, y_of, "J per request"))
    group_w = plot_w / max(1, len(categories))
    bar_w = group_w * 0.8 / max(1, len(models))
    by_key = {(str(r["model"]), str(r["category"])): r for r in rows}
    for ci, cat in enumerate(categories):
        gx = left + ci * group_w + group_w * 0.1
        out.append(
            f'<text x="{left + (ci + 0.5) * group_w:.1f}" y="{y0 + 18:.1f}" '
            f'text-anchor="middle">{escape(cat)}</text>'
        )
        for mi, model in enumerate(models):
            r = by_key.get((model, cat))
            if r is None:
                continue
            x = gx + mi * bar_w
            value = r.get("mean_joules")
            if value is None:  # every request failed: mark it, draw no bar
                out.append(
                    f'<text class="failed" x="{x + bar_w / 2:.1f}" y="{y0 - 4:.1f}" '
                    f'text-anchor="middle" fill="#b00020" data-model="{escape(model)}" '
                    f'data-category="{escape(cat)}">&#215;</text>'
                )
                continue
            y = y_of(float(value))
            out.append(
                f'<rect class="bar" x="{x:.2f}" y="{y:.2f}" width="{bar_w * 0.95:.2f}" '
                f'height="{y0 - y:.2f}" fill="{colors[model]}" data-model="{escape(model)}" '
                f'data-category="{escape(cat)}" data-value="{json.dumps(value)}">'
                f"<title>{escape(model)} / {escape(cat)}: {escape(fmt(value))} J per request"
                f"</title></rect>"
            )
            ci95 = r.get("ci95_joules")
            if ci95:
                cx = x + bar_w * 0.95 / 2
                lo, hi = y_of(max(0.0, float(value) - float(ci95))), y_of(float(value) + ci95)
                out.append(
                    f'<line class="ci" x1="{cx:.2f}" x2="{cx:.2f}" y1="{lo:.2f}" y2="{hi:.2f}" '
                    'stroke="#222"/>'
                )
    out.append(
        f'<line x1="{left}" x2="{left + plot_w}" y1="{y0:.1f}" y2="{y0:.1f}" stroke="#222"/>'
    )
    out.append(_legend(colors, left + plot_w + 16, top + 10))
    out.append("</svg>")
    return "".join(out)


def scatter_svg(
    rows: Sequence[Mapping[str, Any]], colors: Mapping[str, str], width: int = 1000
) -> str:
    """Mean J per request against mean latency (s), a point per model x category."""
    height, left, right, top, bottom = 380, 70, 260, 20, 50
    points = [
        r for r in rows if r.get("mean_joules") is not None and r.get("mean_duration_s") is not None
    ]
    xt = nice_ticks(max([float(r["mean_duration_s"]) for r in points], default=0.0))
    yt = nice_ticks(max([float(r["mean_joules"]) for r in points], default=0.0))
    plot_w, plot_h = width - left - right, height - top - bottom
    y0 = top + plot_h

    def x_of(v: float) -> float:
        return left + plot_w * v / xt[-1]

    def y_of(v: float) -> float:
        return y0 - plot_h * v / yt[-1]

    out = [_svg_open(width, height, "energy per request against latency", "energy-latency")]
    out.append(_y_axis(yt, left, left + plot_w, y_of, "J per request"))
    for t in xt:
        out.append(
            f'<text x="{x_of(t):.1f}" y="{y0 + 18:.1f}" text-anchor="middle">'
            f"{escape(fmt(t))}</text>"
        )
    out.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle">'
        "mean latency per request, s</text>"
    )
    out.append(
        f'<line x1="{left}" x2="{left + plot_w}" y1="{y0:.1f}" y2="{y0:.1f}" stroke="#222"/>'
        f'<line x1="{left}" x2="{left}" y1="{top}" y2="{y0:.1f}" stroke="#222"/>'
    )
    for r in points:
        model, cat = str(r["model"]), str(r["category"])
        x, y = float(r["mean_duration_s"]), float(r["mean_joules"])
        out.append(
            f'<circle class="point" cx="{x_of(x):.2f}" cy="{y_of(y):.2f}" r="5" '
            f'fill="{colors.get(model, "#000")}" fill-opacity="0.8" data-model="{escape(model)}" '
            f'data-category="{escape(cat)}" data-x="{json.dumps(r["mean_duration_s"])}" '
            f'data-y="{json.dumps(r["mean_joules"])}">'
            f"<title>{escape(model)} / {escape(cat)}: {escape(fmt(y))} J in {escape(fmt(x))} s"
            "</title></circle>"
            f'<text class="label" x="{x_of(x) + 7:.2f}" y="{y_of(y) + 4:.2f}" '
            f'font-size="10">{escape(cat)}</text>'
        )
    out.append(_legend(colors, left + plot_w + 16, top + 10))
    out.append("</svg>")
    return "".join(out)
