"""Energy budgets per key: the spec, the periods, the verdict, the book (pure and in
virtual time); then through a real `energy-proxy serve` on real sockets: a tenant past its
budget gets an OpenAI-shaped 429 with Retry-After while another is unaffected, the budget
holds across a restart (SQLite) and across two proxies on one PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends.local.launch import ChildServer, proxy_server
from proxy.budgets import Budget, BudgetBook, Use, Verdict, parse_budget, period_bounds_s
from tests.support.polling import wait_for


def _ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def test_a_budget_spec_reads_as_a_user_writes_it() -> None:
    assert parse_budget("joules=3.6e6,per=hour") == Budget(3.6e6, None, "hour", False)
    assert parse_budget("co2eq_g=12, soft") == Budget(None, 12.0, "day", True)
    assert parse_budget({"joules": 5, "co2eq_g": 1, "per": "month", "soft": True}) == Budget(
        5.0, 1.0, "month", True
    )
    for bad, says in [
        ("per=day", "joules=N or co2eq_g=N"),
        ("joules=-1", "positive"),
        ("joules=nan", "positive"),
        ("joules=lots", "a number"),
        ("joules=1,per=week", "hour, day or month"),
        ("joules=1,watts=3", "not \\['watts'\\]"),
        ("joules,per=day", "joules=N"),  # a bare name is not 1 J
        ({"joules": True}, "joules=N"),
    ]:
        with pytest.raises(ValueError, match=says):
            parse_budget(bad)


def test_periods_are_utc_hours_days_and_months() -> None:
    now = _ts(2026, 2, 28, 13, 45, 10)
    assert period_bounds_s("hour", now) == (_ts(2026, 2, 28, 13), _ts(2026, 2, 28, 14))
    assert period_bounds_s("day", now) == (_ts(2026, 2, 28), _ts(2026, 3, 1))
    assert period_bounds_s("month", now) == (_ts(2026, 2, 1), _ts(2026, 3, 1))
    assert period_bounds_s("month", _ts(2026, 12, 31, 23)) == (_ts(2026, 12, 1), _ts(2027, 1, 1))


def test_the_verdict_says_what_is_left_and_when_it_renews() -> None:
    v = Verdict(Budget(100.0, 2.0, "hour"), Use(0.0, 3600.0, joules=40.0, grams=2.5))
    assert v.exceeded  # the grams are spent, though joules are left
    headers = dict(v.headers())
    assert headers[b"x-energy-budget-remaining-joules"] == b"60"
    big = Verdict(Budget(3_600_000.0), Use(0.0, 1.0, joules=0.5))
    # Plain decimal to the millijoule, never an exponent.
    assert dict(big.headers())[b"x-energy-budget-remaining-joules"] == b"3599999.5"
    assert headers[b"x-energy-budget-remaining-grams"] == b"0"
    assert headers[b"x-energy-budget-exceeded"] == b"true"
    assert v.retry_after_s(3000.2) == 600
    assert v.retry_after_s(3599.99) == 1


def test_the_book_adds_what_ends_and_takes_the_stores_figure_at_each_read() -> None:
    now = [_ts(2026, 1, 1, 10, 30)]
    stored = {"a": (0.0, 0.0)}
    book = BudgetBook(
        {"a": Budget(joules=10.0, per="hour")},
        lambda since: {t: stored[t] for t in since},
        clock=lambda: now[0],
    )
    assert book.check("b") is None  # no budget: no verdict, no headers
    first = book.check("a")
    assert first is not None and not first.exceeded
    book.charge("a", 6.0, 0.1)
    book.charge("a", 5.0, 0.1)
    assert book.check("a").exceeded  # type: ignore[union-attr]
    stored["a"] = (4.0, 0.0)  # the store's figure (what another proxy saw, less)
    asyncio.run(book.refresh())
    assert not book.check("a").exceeded  # type: ignore[union-attr]
    book.charge("a", float("nan"), float("inf"))  # a broken figure charges nothing
    assert book.check("a").use.joules == 4.0  # type: ignore[union-attr]
    now[0] = _ts(2026, 1, 1, 11, 0, 1)  # the next hour: a new period
    assert book.check("a").use.joules == 0.0  # type: ignore[union-attr]


# --- through the proxy ----------------------------------------------------------------


KEY_A, KEY_B = "ep-tenant-a-key", "ep-tenant-b-key"


def _config(tmp_path: Path, db: str) -> Path:
    cfg = tmp_path / "proxy.toml"
    cfg.write_text(
        f'db = "{db}"\n'
        'power_source = "constant:500"\n'
        "budget_refresh_s = 0.2\n"
        "[[keys]]\n"
        'name = "a"\n'
        f'sha256 = "{hashlib.sha256(KEY_A.encode()).hexdigest()}"\n'
        'budget = { joules = 1.0, per = "day" }\n'
        "[[keys]]\n"
        'name = "b"\n'
        f'sha256 = "{hashlib.sha256(KEY_B.encode()).hexdigest()}"\n'
    )
    return cfg


@contextmanager
def _proxy(fake_server: str, cfg: Path, log: Path) -> Iterator[ChildServer]:
    server = proxy_server(fake_server, extra_args=["--config", str(cfg)], log_path=log)
    with server:
        yield server


def _ask(url: str, key: str) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        json={
            "model": "fake-model",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
        },
        headers={"authorization": f"Bearer {key}", "x-fake-delay-s": "0.05"},
        timeout=30,
    )


def _spent(url: str) -> bool:
    return _ask(url, KEY_A).status_code == 429


def test_past_its_budget_a_tenant_gets_429_and_another_does_not(
    fake_server: str, tmp_path: Path
) -> None:
    cfg = _config(tmp_path, str(tmp_path / "r.db"))
    with _proxy(fake_server, cfg, tmp_path / "first.log") as server:
        first = _ask(server.url, KEY_A)  # 500 W for 50 ms: past 1 J
        assert first.status_code == 200
        assert float(first.headers["x-energy-budget-remaining-joules"]) == pytest.approx(1.0)
        refused = _ask(server.url, KEY_A)
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["code"] == "energy_budget_exceeded"
        assert error["type"] == "rate_limit_error"
        assert "1 J per day" in error["message"]
        assert 1 <= int(refused.headers["retry-after"]) <= 86400
        assert refused.headers["x-energy-budget-exceeded"] == "true"
        other = _ask(server.url, KEY_B)
        assert other.status_code == 200
        assert "x-energy-budget-remaining-joules" not in other.headers
        # The backend's other paths are refused too: a spent budget is spent there.
        tokenize = httpx.post(
            server.url + "/tokenize",
            json={"model": "fake-model", "prompt": "hi"},
            headers={"authorization": f"Bearer {KEY_A}"},
            timeout=30,
        )
        assert tokenize.status_code == 429
        assert tokenize.json()["error"]["code"] == "energy_budget_exceeded"
        metrics = httpx.get(server.url + "/metrics").text
        assert 'energy_proxy_tenant_budget_used_ratio{kind="joules",tenant="a"}' in metrics
    # A restart: what was used is in the store.
    with _proxy(fake_server, cfg, tmp_path / "second.log") as server:
        assert _ask(server.url, KEY_A).status_code == 429


def test_a_budget_holds_across_two_proxies_on_one_postgresql(
    fake_server: str, tmp_path: Path, pg_url: str
) -> None:
    cfg = _config(tmp_path, pg_url)
    with ExitStack() as stack:
        one = stack.enter_context(_proxy(fake_server, cfg, tmp_path / "one.log"))
        two = stack.enter_context(_proxy(fake_server, cfg, tmp_path / "two.log"))
        assert _ask(one.url, KEY_A).status_code == 200  # spends it through the first
        # The second sees it once its store read comes round (0.2 s here), never before
        # the first proxy's writer has written it (~0.2 s).
        assert wait_for(lambda: _spent(two.url), timeout_s=20)
        assert _ask(two.url, KEY_B).status_code == 200


def test_the_default_budget_is_every_tenants_not_the_operators() -> None:
    from types import SimpleNamespace

    from proxy.app import budget_book
    from proxy.auth import KeyRing, make_key

    h = hashlib.sha256
    keys = KeyRing([
        make_key("a", h(b"1").hexdigest()),
        make_key("ops", h(b"2").hexdigest(), admin=True),
        make_key("c", h(b"3").hexdigest(), budget=Budget(co2eq_g=5.0, per="month")),
    ])  # fmt: skip
    store: Any = SimpleNamespace(tenants_usage=lambda since: {})
    book = budget_book(keys, Budget(joules=100.0), store, 5.0)
    assert book is not None
    assert book.budgets == {"a": Budget(joules=100.0), "c": Budget(co2eq_g=5.0, per="month")}
    assert budget_book(KeyRing([make_key("a", h(b"1").hexdigest())]), None, store, 5.0) is None
