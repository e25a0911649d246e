"""The Energy Score label: valid SVG, the facts on it, escaping, the unrated label."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from metering.ratings.label import format_wh, render_label

SVG = "{http://www.w3.org/2000/svg}"


def texts(svg: str) -> list[str]:
    root = ET.fromstring(svg)
    return ["".join(el.itertext()) for el in root.iter(f"{SVG}text")]


def title(svg: str) -> str:
    el = ET.fromstring(svg).find(f"{SVG}title")
    assert el is not None
    return el.text or ""


def label(**overrides: object) -> str:
    args: dict[str, object] = {
        "model": "llama-3-8b",
        "category": "code",
        "stars": 4,
        "wh_per_1000_queries": 12.345,
        "hardware": "NVIDIA L4",
        "date": "2025-06-01",
        "count": 240,
    }
    args.update(overrides)
    return render_label(**args)  # type: ignore[arg-type]


def test_label_is_standalone_svg_with_the_facts() -> None:
    svg = label()
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    assert root.get("viewBox") == f"0 0 {root.get('width')} {root.get('height')}"
    assert root.get("data-stars") == "4"
    lines = texts(svg)
    assert "llama-3-8b" in lines
    assert "Task: code" in lines
    assert "12.3" in lines
    assert "Wh per 1,000 queries" in lines
    assert "4 of 5 stars" in lines
    assert "Hardware: NVIDIA L4" in lines
    assert "Date: 2025-06-01" in lines
    assert "Based on 240 requests" in lines
    assert "llama-3-8b, code: 4 of 5 stars" in title(svg)


@pytest.mark.parametrize("stars", [1, 2, 3, 4, 5])
def test_the_arrow_points_at_one_band(stars: int) -> None:
    lines = texts(label(stars=stars))
    arrows = [t for t in lines if t[:1].isdigit() and t.endswith("\u2605")]
    assert arrows == [f"{stars}\u2605"]
    for band in range(1, 6):  # all five bars are drawn
        assert "\u2605" * band in lines


def test_model_name_is_escaped() -> None:
    evil = "<script>alert(1)</script>&\"x'</svg>"
    svg = label(model=evil, hardware="<b>gpu</b>", date='"today"', category="a&b")
    assert "<script" not in svg
    assert "</b>" not in svg
    root = ET.fromstring(svg)  # still well-formed
    assert not [el for el in root.iter() if el.tag.endswith("script")]
    assert "Task: a&b" in texts(svg)
    assert "Hardware: <b>gpu</b>" in texts(svg)
    assert evil in title(svg)  # whole in the title; shortened on the face
    assert any(t.startswith('<script>alert(1)</script>&"x') for t in texts(svg))


def test_output_is_ascii_and_survives_characters_xml_cannot_hold() -> None:
    svg = label(model="mod\u00e8le-\u65e5\u672c\x00\x1b\ud800", hardware="tab\there")
    assert svg.isascii()
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    assert "mod\u00e8le-\u65e5\u672c\ufffd\ufffd\ufffd" in texts(svg)
    assert "Hardware: tab here" in texts(svg)


def test_long_names_are_shortened_on_the_face_only() -> None:
    name = "organisation/" + "x" * 60
    svg = label(model=name)
    assert name in title(svg)
    face = [t for t in texts(svg) if t.startswith("organisation/")]
    assert len(face) == 1 and face[0].endswith("\u2026") and len(face[0]) == 30


def test_unrated_label() -> None:
    svg = label(stars=None, wh_per_1000_queries=0.0412, count=7)
    root = ET.fromstring(svg)
    assert root.get("data-stars") == "none"
    lines = texts(svg)
    assert "Not rated: fewer than 20 requests" in lines
    assert "0.0412" in lines
    assert "Based on 7 requests" in lines
    assert not [t for t in lines if t[:1].isdigit() and t.endswith("\u2605")]  # no arrow
    assert "fewer than 50 requests" in " ".join(texts(label(stars=None, count=7, min_count=50)))
    no_energy = texts(label(stars=None, wh_per_1000_queries=None, count=100))
    assert "Not rated: no energy measured" in no_energy
    assert "n/a" in no_energy


def test_deterministic() -> None:
    assert label() == label()
    assert label(stars=None) == label(stars=None)


@pytest.mark.parametrize("bad", [0, 6, -1])
def test_stars_out_of_range_are_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="stars"):
        label(stars=bad)


def test_format_wh() -> None:
    assert format_wh(1234.5) == "1,234"
    assert format_wh(12.345) == "12.3"
    assert format_wh(1.2345) == "1.23"
    assert format_wh(0.0412) == "0.0412"
    assert format_wh(0.0) == "0"
    assert format_wh(float("nan")) == "n/a"
