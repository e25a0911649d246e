"""An Energy Score label as standalone SVG, in the spirit of an appliance energy label. Pure.

Five coloured bars of growing length, green (5 stars, least energy) to red (1 star), as on
the EU energy label; a black arrow points at the model's band. Below them: the energy in
Wh per 1,000 queries, the hardware, the date and the number of requests it rests on, and a
line naming the method (the AI Energy Score's five equal bands; see `energy_score`). The
AI Energy Score's own label carries the same facts: model, task, energy, date, hardware,
stars.

An unrated model (stars None) gets grey bars, no arrow, and the reason: fewer than the
minimum number of requests, or no energy measured.

Every piece of text is user input as far as this module knows (model names come from
clients and backends), so all of it is XML-escaped; characters XML 1.0 cannot carry at all
(control characters, lone surrogates) become U+FFFD, and the output is pure ASCII (other
characters as numeric references), so it stays valid whatever encoding it is served with.
The same arguments always give the same bytes.
"""

from __future__ import annotations

import html
import math
import re
from typing import Final

from metering.ratings.score import BANDS, MIN_REQUESTS_FOR_RATING

WIDTH: Final = 340
HEIGHT: Final = 524
FONT: Final = "Helvetica, Arial, sans-serif"
# EU energy label greens to red (A, between B and C, D, between E and F, G).
BAND_COLOURS: Final = {5: "#00a651", 4: "#8dc63f", 3: "#fff200", 2: "#f7941d", 1: "#ed1c24"}
BAND_TEXT_COLOURS: Final = {5: "#ffffff", 4: "#1a1a1a", 3: "#1a1a1a", 2: "#1a1a1a", 1: "#ffffff"}
UNRATED_COLOUR: Final = "#c8c8c8"
STAR: Final = "\u2605"
MAX_MODEL_CHARS: Final = 30
MAX_LINE_CHARS: Final = 40

_BAR_TOP: Final = 118
_BAR_HEIGHT: Final = 34
_BAR_GAP: Final = 7
_BAR_LEFT: Final = 20
_BAR_MIN_WIDTH: Final = 120
_BAR_STEP: Final = 26
_ARROW_LEFT: Final = 258

# Not in XML 1.0's Char production (tab, newline and CR are turned into spaces first).
_NOT_XML_CHAR: Final = re.compile("[^\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_WHITESPACE: Final = re.compile(r"[\t\n\r]+")


def render_label(
    model: str,
    category: str,
    stars: int | None,
    wh_per_1000_queries: float | None,
    hardware: str,
    date: str,
    count: int,
    *,
    min_count: int = MIN_REQUESTS_FOR_RATING,
) -> str:
    """The label as an SVG document (a str, ASCII only).

    `stars` 1-5, or None for an unrated model; `wh_per_1000_queries` None when unknown;
    `count` the successful requests the figure rests on; `min_count` the minimum for a
    rating, named on an unrated label. Long model names and lines are shortened with an
    ellipsis on the label; the `<title>` keeps them whole.
    """
    if stars is not None and not 1 <= stars <= BANDS:
        raise ValueError(f"stars must be 1-{BANDS} or None, got {stars!r}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    value = "n/a" if wh_per_1000_queries is None else format_wh(wh_per_1000_queries)
    if stars is None:
        if count < min_count:
            rating = f"Not rated: fewer than {min_count:,} requests"
        elif wh_per_1000_queries is None:
            rating = "Not rated: no energy measured"
        else:
            rating = "Not rated"
    else:
        rating = f"{stars} of {BANDS} stars"
    title = (
        f"Energy Score label: {model}, {category}: {rating}; {value} Wh per 1,000 queries; "
        f"{hardware}; {date}; based on {count:,} requests"
    )

    parts: list[str] = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'data-stars="{"none" if stars is None else stars}">',
        f"<title>{_text(title)}</title>",
        f'<g font-family="{FONT}">',
        f'<rect x="1" y="1" width="{WIDTH - 2}" height="{HEIGHT - 2}" rx="10" '
        'fill="#ffffff" stroke="#1a1a1a" stroke-width="2"/>',
        f'<rect x="1" y="1" width="{WIDTH - 2}" height="44" rx="10" fill="#1a1a1a"/>',
        f'<rect x="1" y="30" width="{WIDTH - 2}" height="15" fill="#1a1a1a"/>',
        '<text x="20" y="30" font-size="20" font-weight="bold" fill="#ffffff">Energy Score</text>',
        f'<text x="{WIDTH - 20}" y="30" font-size="11" fill="#ffffff" text-anchor="end">'
        "AI inference</text>",
        f'<text x="20" y="74" font-size="17" font-weight="bold">'
        f"{_text(_shorten(model, MAX_MODEL_CHARS))}</text>",
        f'<text x="20" y="96" font-size="13" fill="#444444">Task: '
        f"{_text(_shorten(category, MAX_LINE_CHARS))}</text>",
    ]
    parts.extend(_bars(stars))
    value_y = _BAR_TOP + BANDS * (_BAR_HEIGHT + _BAR_GAP) + 34
    parts += [
        f'<line x1="20" y1="{value_y - 26}" x2="{WIDTH - 20}" y2="{value_y - 26}" '
        'stroke="#1a1a1a" stroke-width="1"/>',
        f'<text x="{WIDTH // 2}" y="{value_y + 8}" font-size="30" font-weight="bold" '
        f'text-anchor="middle">{_text(value)}</text>',
        f'<text x="{WIDTH // 2}" y="{value_y + 28}" font-size="13" text-anchor="middle">'
        "Wh per 1,000 queries</text>",
        f'<text x="{WIDTH // 2}" y="{value_y + 52}" font-size="13" font-weight="bold" '
        f'text-anchor="middle">{_text(rating)}</text>',
        f'<text x="20" y="{value_y + 80}" font-size="12">Hardware: '
        f"{_text(_shorten(hardware, MAX_LINE_CHARS))}</text>",
        f'<text x="20" y="{value_y + 98}" font-size="12">Date: '
        f"{_text(_shorten(date, MAX_LINE_CHARS))}</text>",
        f'<text x="20" y="{value_y + 116}" font-size="12">Based on {count:,} requests</text>',
        f'<text x="20" y="{HEIGHT - 30}" font-size="10" fill="#666666">'
        "Stars: the energy range of the models rated for this task,</text>",
        f'<text x="20" y="{HEIGHT - 16}" font-size="10" fill="#666666">'
        "cut into five equal bands (AI Energy Score method).</text>",
        "</g>",
        "</svg>",
    ]
    return "\n".join(parts) + "\n"


def format_wh(value: float) -> str:
    """Watt-hours for display: about three significant digits, thousands separated."""
    if not math.isfinite(value):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    if magnitude == 0:
        return "0"
    return f"{value:.3g}"


def _bars(stars: int | None) -> list[str]:
    out: list[str] = []
    for i, band in enumerate(range(BANDS, 0, -1)):
        y = _BAR_TOP + i * (_BAR_HEIGHT + _BAR_GAP)
        width = _BAR_MIN_WIDTH + i * _BAR_STEP
        colour = UNRATED_COLOUR if stars is None else BAND_COLOURS[band]
        text_colour = "#1a1a1a" if stars is None else BAND_TEXT_COLOURS[band]
        tip = _BAR_LEFT + width
        mid = y + _BAR_HEIGHT // 2
        out += [
            f'<polygon points="{_BAR_LEFT},{y} {tip - 14},{y} {tip},{mid} '
            f'{tip - 14},{y + _BAR_HEIGHT} {_BAR_LEFT},{y + _BAR_HEIGHT}" fill="{colour}"/>',
            f'<text x="{_BAR_LEFT + 8}" y="{mid + 6}" font-size="17" fill="{text_colour}">'
            f"{_text(STAR * band)}</text>",
        ]
        if band == stars:
            right = WIDTH - 20
            out += [
                f'<polygon points="{_ARROW_LEFT},{mid} {_ARROW_LEFT + 16},{y} {right},{y} '
                f'{right},{y + _BAR_HEIGHT} {_ARROW_LEFT + 16},{y + _BAR_HEIGHT}" '
                'fill="#1a1a1a"/>',
                f'<text x="{(_ARROW_LEFT + 16 + right) // 2}" y="{mid + 7}" font-size="19" '
                f'font-weight="bold" fill="#ffffff" text-anchor="middle">'
                f"{band}{_text(STAR)}</text>",
            ]
    return out


def _shorten(text: str, limit: int) -> str:
    text = _WHITESPACE.sub(" ", text)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _text(text: str) -> str:
    """Escape for XML text and attribute values, ASCII only (see the module docstring)."""
    cleaned = _NOT_XML_CHAR.sub("\ufffd", _WHITESPACE.sub(" ", text))
    escaped = html.escape(cleaned, quote=True)
    return escaped.encode("ascii", "xmlcharrefreplace").decode("ascii")
