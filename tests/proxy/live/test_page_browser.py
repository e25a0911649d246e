"""The live page in a real headless Chromium (tests/support/browser.py), against the proxy and a
fake backend on real sockets: rows, chart points and stars appear without a reload, hostile
names stay text, and with keys the page asks for one and keeps it out of every URL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from metering.ratings.score import MIN_REQUESTS_FOR_RATING
from proxy.auth import hash_key
from tests.conftest import serve_proxy
from tests.support.browser import chromium
from tests.support.fakes.openai_backend import FakeState, make_fake_backend
from tests.support.servers import ServerThread

WAIT_MS = 20_000  # for things that happen within a second or two; generous for loaded CI
PAGE_BUDGET_BYTES = 100_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser: Any, tmp_path: Path) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.errors = errors  # type: ignore[attr-defined]
    pg.seen_urls = []  # type: ignore[attr-defined]
    pg.on("request", lambda req: pg.seen_urls.append(req.url))  # type: ignore[attr-defined]
    yield pg
    context.close()


def finish(page: Any, tmp_path: Path) -> None:
    """At the end of a test, while its proxy still runs: a screenshot into the test's
    directory, and no script error nor any request the page's policy refused (the
    browser reports both as errors)."""
    page.screenshot(path=str(tmp_path / "live-page.png"), full_page=True)
    assert (tmp_path / "live-page.png").stat().st_size > 0
    assert page.errors == []


def ask(url: str, n: int, *, key: str = "unused", category: str = "code",
        model: str = "fake-model", **headers: str) -> list[dict[str, Any]]:  # fmt: skip
    """n chat requests through the real openai client; the energy objects it was told."""
    told = []
    with OpenAI(base_url=url + "/v1", api_key=key, max_retries=0) as client:
        for i in range(n):
            r = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": f"Write a function number {i}."}],
                extra_headers={"x-prompt-category": category, **headers},
            )
            told.append((r.model_extra or {})["energy"])
    return told


def wait_live(page: Any) -> None:
    page.wait_for_function("() => document.getElementById('conn').textContent === 'live'")


def chart_points(page: Any) -> int:
    return int(
        page.evaluate(
            "Math.max(0, ...[...document.querySelectorAll('#chart polyline.source')]"
            ".map(l => +l.dataset.points))"
        )
    )


def test_rows_chart_and_stars_appear_without_a_reload(
    fake_server: str, tmp_path: Path, page: Any
) -> None:
    with serve_proxy(tmp_path, fake_server) as url:
        response = page.goto(url + "/")
        assert response.status == 200
        html = response.body()
        assert len(html) <= PAGE_BUDGET_BYTES  # the whole page: nothing else to load
        assert "script-src 'sha256-" in response.headers["content-security-policy"]
        page.evaluate("window.__sameDocument = 1")
        wait_live(page)
        # What is measured, and the grid figure in use, from the hello event.
        assert "constant" in page.inner_text("#sources")
        assert page.inner_text("#sources .badge") == "configured"
        assert page.inner_text("#carbon").startswith("500 gCO2eq/kWh (static")
        # The chart gains a point a second.
        page.wait_for_function(
            "() => [...document.querySelectorAll('#chart polyline.source')]"
            ".some(l => +l.dataset.points >= 2)"
        )
        before = chart_points(page)
        told = ask(url, MIN_REQUESTS_FOR_RATING)
        page.wait_for_function(
            f"() => document.querySelectorAll('#requests tbody tr').length >= {len(told)}"
        )
        page.wait_for_function(
            "n => +document.querySelector('#chart polyline.source').dataset.points > n",
            arg=before,
        )
        # Newest first, one row per request, each saying what its client was told.
        ids = page.eval_on_selector_all(
            "#requests tbody tr", "rows => rows.map(r => r.dataset.requestId)"
        )
        assert ids[: len(told)] == [e["request_id"] for e in reversed(told)]
        top = page.eval_on_selector_all(
            "#requests tbody tr:first-child td", "cells => cells.map(c => c.textContent)"
        )
        last = told[-1]
        assert top[1:6] == ["fake-model", "chat", "code", "fake", "200"]
        assert float(top[7]) == pytest.approx(last["joules"], abs=0.01)
        # A click shows the whole energy object.
        page.click("#requests tbody tr:first-child")
        assert json.loads(page.inner_text("#detail")) == last
        # Enough requests for a rating: the stars and the label appear.
        row = "#models tbody tr[data-model='fake-model'][data-category='code']"
        page.wait_for_selector(row + " [data-stars]")
        assert page.get_attribute(row + " [data-stars]", "data-stars") == "5"  # alone: 5
        assert page.inner_text(row + " td:nth-child(3)") == str(len(told) + 0)
        page.wait_for_function(
            "() => { const i = document.querySelector('#models img.label');"
            " return i && i.complete && i.naturalWidth > 0; }"
        )
        assert page.get_attribute("#models img.label", "src").startswith("blob:")
        assert page.evaluate("window.__sameDocument") == 1  # never reloaded
        # Nothing came from anywhere but the proxy.
        assert all(u.startswith((url + "/", "blob:")) for u in page.seen_urls), page.seen_urls
        finish(page, tmp_path)


HOSTILE_MODEL = '<img src=x onerror="window.__pwned=1">'
HOSTILE_CATEGORY = '"><svg onload=window.__pwned=2>'
HOSTILE_ID = "<script>window.__pwned=3</script>"


def test_hostile_names_stay_text(tmp_path: Path, page: Any) -> None:
    backend_app, _ = make_fake_backend(FakeState(models=["fake-model", HOSTILE_MODEL]))
    categories = ["code", HOSTILE_CATEGORY, "other"]
    with (
        ServerThread(backend_app) as backend,
        serve_proxy(tmp_path, backend, categories=categories) as url,
    ):
        page.goto(url + "/")
        wait_live(page)
        told = ask(url, MIN_REQUESTS_FOR_RATING, model=HOSTILE_MODEL, category=HOSTILE_CATEGORY,
                   **{"x-request-id": HOSTILE_ID})  # fmt: skip
        page.wait_for_function(
            f"() => document.querySelectorAll('#requests tbody tr').length >= {len(told)}"
        )
        cells = page.eval_on_selector_all(
            "#requests tbody tr:first-child td", "cells => cells.map(c => c.textContent)"
        )
        assert [cells[1], cells[3]] == [HOSTILE_MODEL, HOSTILE_CATEGORY]
        page.click("#requests tbody tr:first-child")
        assert json.loads(page.inner_text("#detail")) == told[-1]
        page.wait_for_selector("#models tbody tr [data-stars]")
        model_cells = page.eval_on_selector_all(
            "#models tbody tr td:nth-child(-n+2)", "cells => cells.map(c => c.textContent)"
        )
        assert model_cells == [HOSTILE_MODEL, HOSTILE_CATEGORY]
        page.wait_for_function(
            "() => { const i = document.querySelector('#models img.label');"
            " return i && i.complete && i.naturalWidth > 0; }"
        )
        # The DOM holds no element made from a name: one script, one svg (the chart), and
        # images only the page's own labels; nothing ran.
        dom = page.evaluate(
            """() => ({
                scripts: document.scripts.length,
                svgs: document.querySelectorAll('svg').length,
                strayImages: document.querySelectorAll('img:not(.label)').length,
                pwned: window.__pwned === undefined ? null : window.__pwned,
            })"""
        )
        assert dom == {"scripts": 1, "svgs": 1, "strayImages": 0, "pwned": None}
        finish(page, tmp_path)


KEY_A, KEY_B = "page-key-tenant-a-1", "page-key-tenant-b-2"
KEYS = [f"team-a:{hash_key(KEY_A)}", f"team-b:{hash_key(KEY_B)}"]


def test_with_keys_the_page_asks_for_one_and_keeps_it_out_of_urls(
    fake_server: str, tmp_path: Path, page: Any
) -> None:
    with serve_proxy(tmp_path, fake_server, keys=KEYS) as url:
        assert httpx.get(url + "/").status_code == 200  # the page itself holds no data
        page.goto(url + "/")
        page.wait_for_selector("#keybox", state="visible")
        assert page.inner_text("#conn") == "needs a key"
        page.fill("#key", "not-a-key")
        page.click("#keyform button")
        page.wait_for_function(
            "() => document.getElementById('keyerr').textContent === 'That key was refused.'"
        )
        page.fill("#key", KEY_A)
        page.click("#keyform button")
        wait_live(page)
        assert page.is_hidden("#keybox")
        mine = ask(url, 2, key=KEY_A)
        theirs = ask(url, 1, key=KEY_B)
        page.wait_for_function("() => document.querySelectorAll('#requests tbody tr').length >= 2")
        page.wait_for_selector("#models tbody tr")
        ask(url, 1, key=KEY_A)  # after B's: once it shows, B's would have too
        page.wait_for_function("() => document.querySelectorAll('#requests tbody tr').length >= 3")
        ids = page.eval_on_selector_all(
            "#requests tbody tr", "rows => rows.map(r => r.dataset.requestId)"
        )
        assert theirs[0]["request_id"] not in ids
        assert {e["request_id"] for e in mine} <= set(ids)
        assert page.evaluate("sessionStorage.getItem('energy-proxy-key')") == KEY_A
        assert page.evaluate("localStorage.length") == 0
        assert KEY_A not in page.url
        assert not [u for u in page.seen_urls if KEY_A in u]
        # The browser logs each refused request (no key, then a wrong one): expected here.
        page.errors[:] = [e for e in page.errors if "status of 401 (Unauthorized)" not in e]
        finish(page, tmp_path)


def test_a_tenant_sees_its_own_budget_on_the_page(
    fake_server: str, tmp_path: Path, page: Any
) -> None:
    with serve_proxy(tmp_path, fake_server, keys=KEYS, budget="joules=0.01,per=day") as url:
        own = httpx.get(url + "/v1/energy/budgets", headers={"authorization": f"Bearer {KEY_A}"})
        assert [b["tenant"] for b in own.json()["budgets"]] == ["team-a"]
        page.goto(url + "/")
        page.wait_for_selector("#keybox", state="visible")
        page.fill("#key", KEY_A)
        page.click("#keyform button")
        wait_live(page)
        ask(url, 1, key=KEY_A)  # 100 W for a few milliseconds: past 0.01 J
        page.wait_for_selector("#budgetbox", state="visible")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#budgets tbody tr')]"
            ".some(r => r.dataset.tenant === 'team-a' && r.textContent.includes('spent'))"
        )
        tenants = page.eval_on_selector_all(
            "#budgets tbody tr", "rows => rows.map(r => r.dataset.tenant)"
        )
        assert tenants == ["team-a"]  # never another key's
        page.errors[:] = [e for e in page.errors if "status of 401 (Unauthorized)" not in e]
        finish(page, tmp_path)
