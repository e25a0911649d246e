"""The request store, the same behaviour on both databases: a real SQLite file and a real
PostgreSQL server (tests/support/pg.py). What only one of them does is in test_store_sqlite.py and
test_store_postgres.py."""

from __future__ import annotations

import logging
import math
import random
import threading
from pathlib import Path
from typing import Any

import pytest

from metering.store import RequestRecord, RequestStore, StoreError
from metering.store.rollup import SECONDS_PER_HOUR
from tests.support.storekit import STORE_LOG, make_record, make_report, rid


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a store lives: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "store.db")
    url: str = request.getfixturevalue("pg_url")
    return url


def test_round_trip_rebuilds_the_exact_energy_object(db: str) -> None:
    # Floats that do not survive a careless round trip, every optional field set and unset.
    reports = [
        make_report(rid(1), joules=0.1 + 0.2, co2eq_g=1 / 3, embodied_g=2e-9),
        make_report(
            rid(2),
            zone="DE",
            age_s=123.456,
            cpu_j=0.7,
            attribution="tokens",
            client_request_id="client-7",
            prompt_tokens=None,
        ),
        make_report(rid(3), joules=0.0, completion_tokens=0, prompt_tokens=0, attribution=""),
    ]
    with RequestStore.open(db) as store:
        for rep in reports:
            store.add(RequestRecord.from_report(rep, backend="b", status=200, finished_at=1.5))
        assert store.flush()
        for rep in reports:
            assert store.get(rep.request_id) == rep.to_dict()
        assert store.get(rid(99)) is None
        assert store.get("not-an-id") is None
    with RequestStore.open(db) as again:  # read back from the database, not the queue
        for rep in reports:
            assert again.get(rep.request_id) == rep.to_dict()
        assert again.get("client-7") == reports[1].to_dict()


def test_restart_keeps_records(db: str) -> None:
    with RequestStore.open(db) as store:
        for i in range(20):
            store.add(make_record(rid(i)))
    with RequestStore.open(db) as store:
        assert store.count() == 20
        assert store.get(rid(7)) == make_report(rid(7)).to_dict()
        assert [r["count"] for r in store.summary()] == [20]


def test_records_still_queued_are_found_and_counted(db: str) -> None:
    # A long linger keeps records in the queue until someone flushes.
    with RequestStore.open(db, linger_s=60.0, batch_records=1000) as store:
        store.add(make_record(rid(1), joules=7.0))
        store.add(make_record(rid(2), joules=3.0, client_request_id="mine"))
        assert store.queued == 2
        assert store.db.count() == 0  # nothing written yet
        assert store.get(rid(1)) == make_report(rid(1), joules=7.0).to_dict()
        assert store.get("mine") is not None
        assert [(r["count"], r["mean_joules"]) for r in store.summary()] == [(2, 5.0)]
        assert store.flush()
        assert store.queued == 0 and store.db.count() == 2
        assert [(r["count"], r["mean_joules"]) for r in store.summary()] == [(2, 5.0)]


def test_the_first_record_of_an_id_stays_and_counts_once(db: str) -> None:
    with RequestStore.open(db, linger_s=60.0, batch_records=1000) as store:
        # In one batch, then across batches.
        store.add(make_record(rid(1), joules=1.0))
        store.add(make_record(rid(1), joules=2.0))
        assert store.flush()
        store.add(make_record(rid(1), joules=3.0))
        assert store.flush()
        assert store.count() == 1
        got = store.get(rid(1))
        assert got is not None and got["joules"] == 1.0
        assert [(r["count"], r["mean_joules"]) for r in store.summary()] == [(1, 1.0)]
        assert store.dropped == 0


def test_concurrent_writers_all_land_while_readers_read(db: str) -> None:
    n_threads, per_thread = 6, 250
    errors: list[BaseException] = []
    stop = threading.Event()
    with RequestStore.open(db, batch_records=50) as store:

        def writer(t: int) -> None:
            for i in range(per_thread):
                store.add(make_record(rid(t * 10_000 + i), model=f"m{t % 2}"))

        def reader() -> None:
            try:
                while not stop.is_set():
                    store.get(rid(0))
                    # Never more than was added, never a batch counted twice.
                    counted = sum(r["count"] for r in store.summary())
                    assert counted <= n_threads * per_thread
            except BaseException as e:
                errors.append(e)

        readers = [threading.Thread(target=reader) for _ in range(2)]
        writers = [threading.Thread(target=writer, args=(t,)) for t in range(n_threads)]
        for th in [*readers, *writers]:
            th.start()
        for th in writers:
            th.join(timeout=60.0)
        # Everything added is counted at once, written or not.
        assert sum(r["count"] for r in store.summary()) == n_threads * per_thread
        stop.set()
        for th in readers:
            th.join(timeout=60.0)
        assert not errors
        assert store.flush()
        assert store.count() == n_threads * per_thread
        assert store.dropped == 0
        assert sum(r["count"] for r in store.summary()) == n_threads * per_thread


def test_a_record_the_database_cannot_take_is_dropped_loudly_the_rest_land(
    db: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=STORE_LOG)
    huge = make_record(rid(2), prompt_tokens=2**70)  # no integer column holds it
    not_a_label = RequestRecord(**{**_fields(make_record(rid(3))), "method": 42})  # type: ignore[arg-type]
    with RequestStore.open(db, linger_s=60.0, batch_records=1000) as store:
        store.add(make_record(rid(1)))
        store.add(huge)
        store.add(not_a_label)
        store.add("not a record at all")  # type: ignore[arg-type]
        store.add(make_record(rid(4)))
        assert store.flush()
        assert store.count() == 2
        assert store.dropped == 3
        assert store.get(rid(1)) is not None and store.get(rid(4)) is not None
        assert store.get(rid(2)) is None
        assert [r["count"] for r in store.summary()] == [2]
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 3 and any(rid(2) in m for m in refused)


def _fields(r: RequestRecord) -> dict[str, Any]:
    return {f: getattr(r, f) for f in r.__dataclass_fields__}


def test_summary_math_by_hand(db: str) -> None:
    with RequestStore.open(db) as store:
        # m1/code: 10, 20, 30 J over 5, 5, 10 completion tokens -> 60 J / 20 tokens.
        store.add(make_record(rid(1), joules=10.0, completion_tokens=5, co2eq_g=1.0))
        store.add(make_record(rid(2), joules=20.0, completion_tokens=5, co2eq_g=2.0))
        store.add(make_record(rid(3), joules=30.0, completion_tokens=10, co2eq_g=6.0))
        # Not successful: left out everywhere.
        store.add(make_record(rid(4), status=499, joules=1000.0, completion_tokens=1))
        store.add(make_record(rid(5), status=502, joules=1000.0, completion_tokens=1))
        # m1/other: an embedding (prompt tokens count) and one with no tokens at all, which
        # counts in mean_joules but not in J/token: 4 J / 8 tokens.
        store.add(
            make_record(
                rid(6), category="other", joules=4.0, completion_tokens=0, prompt_tokens=8,
                co2eq_g=0.5,
            )
        )  # fmt: skip
        store.add(
            make_record(
                rid(7), category="other", joules=6.0, completion_tokens=0, prompt_tokens=None,
                co2eq_g=1.5,
            )
        )  # fmt: skip
        # m2/code: no tokens anywhere -> J/token is None.
        store.add(
            make_record(
                rid(8), model="m2", joules=3.0, completion_tokens=0, prompt_tokens=0, co2eq_g=0.25
            )
        )
        expected = [
            {
                "model": "m1",
                "category": "code",
                "count": 3,
                "mean_joules": pytest.approx(20.0),
                "mean_joules_per_token": pytest.approx(3.0),
                "mean_co2eq_g": pytest.approx(3.0),
            },
            {
                "model": "m1",
                "category": "other",
                "count": 2,
                "mean_joules": pytest.approx(5.0),
                "mean_joules_per_token": pytest.approx(0.5),
                "mean_co2eq_g": pytest.approx(1.0),
            },
            {
                "model": "m2",
                "category": "code",
                "count": 1,
                "mean_joules": pytest.approx(3.0),
                "mean_joules_per_token": None,
                "mean_co2eq_g": pytest.approx(0.25),
            },
        ]
        assert store.summary() == expected  # queued
        assert store.flush()
        assert store.summary() == expected  # from the rollups
        assert [(r["model"], r["category"]) for r in store.summary(min_count=2)] == [
            ("m1", "code"),
            ("m1", "other"),
        ]
        assert store.summary(min_count=4) == []


def test_summary_equals_the_records_for_any_window_and_tenant(db: str) -> None:
    """2,000 records over 3 days, 3 tenants, 2 backends, odd statuses; the summary from the
    rollups (and the queue) against the same figures computed from the records."""
    rng = random.Random(14)
    t0 = 1_764_000_000.0
    records = [
        make_record(
            rid(i),
            finished_at=t0 + rng.uniform(0, 3 * 86_400),
            model=rng.choice(["a", "b"]),
            category=rng.choice(["code", "chat"]),
            backend=rng.choice(["x", "y"]),
            tenant=rng.choice(["", "t1", "t2"]),
            status=rng.choice([200, 200, 200, 499, 502]),
            joules=rng.uniform(0, 50),
            co2eq_g=rng.uniform(0, 0.01),
            completion_tokens=rng.choice([0, 1, 17, 200]),
            prompt_tokens=rng.choice([None, 0, 12]),
        )
        for i in range(2000)
    ]
    with RequestStore.open(db, batch_records=300) as store:
        for r in records[:1500]:
            store.add(r)
        assert store.flush()
        with RequestStore.open(db, linger_s=60.0, batch_records=10_000) as second:
            for r in records[1500:]:
                second.add(r)  # queued in the second store: it counts them as well
            for since in (None, t0, t0 + 86_400 + 1234.5, t0 + 3 * 86_400):
                for tenant in (None, "", "t1", "t3"):
                    got = second.summary(tenant=tenant, since_s=since)
                    assert got == _expected(records, tenant, since), (since, tenant)


def _expected(
    records: list[RequestRecord], tenant: str | None, since_s: float | None
) -> list[dict[str, Any]]:
    hour = None if since_s is None else math.floor(since_s / SECONDS_PER_HOUR)
    groups: dict[tuple[str, str], list[RequestRecord]] = {}
    for r in records:
        if r.status != 200 or (tenant is not None and r.tenant != tenant):
            continue
        if hour is not None and math.floor(r.finished_at / SECONDS_PER_HOUR) < hour:
            continue
        groups.setdefault((r.model, r.category), []).append(r)
    out = []
    for (model, category), rs in sorted(groups.items()):
        tokens = sum(r.rated_tokens for r in rs)
        out.append(
            {
                "model": model,
                "category": category,
                "count": len(rs),
                "mean_joules": pytest.approx(sum(r.joules for r in rs) / len(rs), rel=1e-9),
                "mean_joules_per_token": (
                    pytest.approx(sum(r.joules for r in rs if r.rated_tokens) / tokens, rel=1e-9)
                    if tokens
                    else None
                ),
                "mean_co2eq_g": pytest.approx(sum(r.co2eq_g for r in rs) / len(rs), rel=1e-9),
            }
        )
    return out


def test_models_no_backend_lists_are_summed_as_other(db: str) -> None:
    with RequestStore.open(db) as store:
        store.add(make_record(rid(1), model="listed"))
        store.add(make_record(rid(2), model="made-up-1", model_group="other"))
        store.add(make_record(rid(3), model="made-up-2", model_group="other"))
        assert store.flush()
        assert [(r["model"], r["count"]) for r in store.summary()] == [("listed", 1), ("other", 2)]
        got = store.get(rid(2))
        assert got is not None and got["model"] == "made-up-1"  # the record keeps its name


def test_tenants_see_their_own_records_by_either_id(db: str) -> None:
    with RequestStore.open(db) as store:
        store.add(make_record(rid(1), tenant="a", client_request_id="same-id"))
        store.add(make_record(rid(2), tenant="b", client_request_id="same-id", finished_at=2000))
        store.add(make_record(rid(3), tenant="a", client_request_id="again", finished_at=3000))
        store.add(make_record(rid(4), tenant="a", client_request_id="again", finished_at=4000))
        for flushed in (False, True):
            if flushed:
                assert store.flush()
            assert store.get(rid(1), "a") is not None
            assert store.get(rid(1), "b") is None  # another tenant's: as good as unknown
            assert store.get(rid(1), "nobody") is None
            a, b = store.get("same-id", "a"), store.get("same-id", "b")
            assert a is not None and a["request_id"] == rid(1)
            assert b is not None and b["request_id"] == rid(2)
            latest = store.get("again", "a")
            assert latest is not None and latest["request_id"] == rid(4)
            assert [r["count"] for r in store.summary(tenant="a")] == [3]
            assert store.summary(tenant="nobody") == []


def test_prune_drops_old_records_and_old_hours_of_rollups(db: str) -> None:
    now_s = [100 * SECONDS_PER_HOUR]
    with RequestStore.open(db, clock=lambda: now_s[0]) as store:
        times = [1.0 * SECONDS_PER_HOUR, 2.5 * SECONDS_PER_HOUR, 3 * SECONDS_PER_HOUR, 99.0 * 3600]
        for i, t in enumerate(times):
            store.add(make_record(rid(i), finished_at=t))
        # Everything finished before hour 2.75 goes; the rollups of hours 0 and 1 go.
        assert store.prune(older_than_s=now_s[0] - 2.75 * SECONDS_PER_HOUR) == 2
        assert store.count() == 2
        assert store.get(rid(0)) is None and store.get(rid(2)) is not None
        # Hour 2 keeps its rollup (it had not ended), though its record is gone; day 0
        # keeps all of its own until the whole day is past the cutoff.
        assert [r["count"] for r in store.summary(since_s=2 * SECONDS_PER_HOUR)] == [3]
        assert [r["count"] for r in store.summary()] == [4]
        assert store.prune(older_than_s=now_s[0] - 2.75 * SECONDS_PER_HOUR) == 0
        now_s[0] = 200 * SECONDS_PER_HOUR
        assert store.prune(older_than_s=0.0) == 2
        assert store.count() == 0
        assert store.summary() == []


def test_close_flushes_everything_queued(db: str) -> None:
    store = RequestStore.open(db, linger_s=60.0, batch_records=64)
    for i in range(1000):
        store.add(make_record(rid(i)))
    store.close()
    with RequestStore.open(db) as again:
        assert again.count() == 1000


def test_close_is_idempotent_and_later_adds_are_counted(
    db: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=STORE_LOG)
    store = RequestStore.open(db)
    store.close()
    store.close()
    store.add(make_record(rid(1)))  # must not raise on the request path
    store.add(make_record(rid(2)))
    assert store.dropped == 2
    assert sum("closed" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(StoreError, match="closed"):
        store.get(rid(1))
    with pytest.raises(StoreError, match="closed"):
        store.summary()


def test_status_says_what_the_store_is_and_how_it_goes(db: str) -> None:
    with RequestStore.open(db, max_mb=64) as store:
        store.add(make_record(rid(1)))
        assert store.flush()
        st = store.status().to_dict()
        assert st == {
            "kind": "postgresql" if db.startswith("postgresql") else "sqlite",
            "where": st["where"],
            "ok": True,
            "queued": 0,
            "dropped": 0,
            "evicted": 0,
            "error": None,
            "max_mb": 64.0,
            "journal": None,
            "journal_failed": 0,
        }
        assert "@" not in st["where"] or ":" not in st["where"].split("@")[0][13:]


def test_tenant_usage_counts_every_status_and_outlives_the_process(db: str) -> None:
    t = 100 * SECONDS_PER_HOUR + 60.0
    with RequestStore.open(db) as store:
        store.add(make_record(rid(1), tenant="a", joules=10.0, co2eq_g=1.0, finished_at=t))
        # A client that hung up mid-stream used energy too: budgets count it.
        store.add(make_record(rid(2), tenant="a", joules=5.0, co2eq_g=0.5, status=499,
                              finished_at=t + 1))  # fmt: skip
        store.add(make_record(rid(3), tenant="b", joules=7.0, co2eq_g=0.7, finished_at=t))
        store.add(make_record(rid(4), tenant="a", joules=100.0, co2eq_g=9.0,
                              finished_at=t - 2 * SECONDS_PER_HOUR))  # fmt: skip
        # Still queued: counted already.
        assert store.tenant_usage("a", t) == pytest.approx((15.0, 1.5))
        assert store.flush()
        assert store.tenant_usage("a", t) == pytest.approx((15.0, 1.5))
        assert store.tenant_usage("a", t - 2 * SECONDS_PER_HOUR) == pytest.approx((115.0, 10.5))
        assert store.tenant_usage("b", t) == pytest.approx((7.0, 0.7))
        # And the rollups still count the successful ones only.
        assert sum(r["count"] for r in store.summary(tenant="a", since_s=t)) == 1
    with RequestStore.open(db) as again:
        assert again.tenant_usage("a", t) == pytest.approx((15.0, 1.5))
        assert again.tenant_usage("nobody", t) == (0.0, 0.0)
