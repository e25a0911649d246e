"""The request store in PostgreSQL: one store for a fleet, and PostgreSQL going away.

Against a real server (Debian's postgresql, started by tests/support/pg.py on 127.0.0.1)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

import psycopg
import pytest

from metering.store import RequestRecord, RequestStore, StoreError
from metering.store.columns import COLUMNS, COLUMNS_V4, encode
from metering.store.postgres import BYTES_PER_RECORD, PostgresDatabase
from metering.store.postgres_schema import MIGRATIONS, SCHEMA, SCHEMA_VERSION
from tests.support.pg import PostgresServer
from tests.support.polling import wait_until
from tests.support.storekit import STORE_LOG, make_record, rid


def fast(url: str, **kw: object) -> RequestStore:
    return RequestStore.open(url, retry_initial_s=0.01, retry_max_s=0.2, **kw)  # type: ignore[arg-type]


def test_schema_lives_in_its_own_namespace_and_is_versioned(pg_url: str) -> None:
    with RequestStore.open(pg_url) as store:
        store.add(make_record(rid(1)))
        assert store.flush()
    with psycopg.connect(pg_url) as c:
        tables = {
            r[0]
            for r in c.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                (SCHEMA,),
            )
        }
        assert tables == {
            "labels",
            "records",
            "rollups",
            "rollups_daily",
            "schema_version",
            "tenant_usage",
        }
        assert c.execute(f"SELECT version FROM {SCHEMA}.schema_version").fetchall() == [
            (SCHEMA_VERSION,)
        ]
        row = c.execute(f"SELECT rid, finished_ms, status FROM {SCHEMA}.records").fetchone()
        assert row == (bytes.fromhex(rid(1)[4:]), 1_000_000, 200)
        public = c.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
        assert public == (0,)  # nothing of ours beside the database's other tables


def test_a_newer_schema_is_refused(pg_url: str) -> None:
    RequestStore.open(pg_url).close()
    with psycopg.connect(pg_url) as c:
        c.execute(f"UPDATE {SCHEMA}.schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer"):
        RequestStore.open(pg_url)


def _v2_database(url: str, records: list[RequestRecord]) -> None:
    """A store as energy-proxy wrote it at schema 2: no endpoint, no untracked flag (its
    rollups are left out: the test reads records)."""
    with psycopg.connect(url) as c, c.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {SCHEMA}")
        cur.execute(f"CREATE TABLE {SCHEMA}.schema_version (version integer NOT NULL)")
        for m in MIGRATIONS[:2]:
            m(cur)
        cur.execute(f"INSERT INTO {SCHEMA}.schema_version VALUES (2)")

        def label(text: str) -> int:
            cur.execute(
                f"INSERT INTO {SCHEMA}.labels (text) VALUES (%s) ON CONFLICT (text) DO NOTHING",
                (text,),
            )
            row = cur.execute(f"SELECT id FROM {SCHEMA}.labels WHERE text = %s", (text,))
            return int(row.fetchone()[0])  # type: ignore[index]

        marks = ", ".join("%s" for _ in COLUMNS_V4)
        for r in records:
            row = encode(r, label)[: len(COLUMNS_V4)]
            cur.execute(
                f"INSERT INTO {SCHEMA}.records ({', '.join(COLUMNS_V4)}) VALUES ({marks})", row
            )


def test_a_version_2_store_reads_back_its_records_as_chat(pg_url: str) -> None:
    old = [make_record(rid(1)), make_record(rid(2), status=499, client_request_id="c2")]
    _v2_database(pg_url, old)
    with RequestStore.open(pg_url) as store:
        for r in old:
            got = store.get(r.request_id)
            assert got == r.energy()
            assert got is not None
            assert got["endpoint"] == "chat" and got["shared_with_untracked"] is None
        store.add(replace(make_record(rid(3)), endpoint="rerank", shared_with_untracked=True))
        assert store.flush()
        got = store.get(rid(3))
        assert got is not None
        assert got["endpoint"] == "rerank" and got["shared_with_untracked"] is True
    with psycopg.connect(pg_url) as c:
        assert c.execute(f"SELECT version FROM {SCHEMA}.schema_version").fetchall() == [
            (SCHEMA_VERSION,)
        ]
        cols = c.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s "
            "AND table_name = 'records' ORDER BY ordinal_position",
            (SCHEMA,),
        ).fetchall()
        assert tuple(c for (c,) in cols) == ("id", *COLUMNS)


def test_every_endpoint_and_untracked_flag_round_trips(pg_url: str) -> None:
    records = [
        replace(make_record(rid(i)), endpoint=endpoint, shared_with_untracked=shared)
        for i, (endpoint, shared) in enumerate(
            [("responses", True), ("messages", False), ("audio", None), ("pooling", True)]
        )
    ]
    with RequestStore.open(pg_url) as store:
        for r in records:
            store.add(r)
        assert store.flush()
        for r in records:
            assert store.get(r.request_id) == r.energy()


def test_an_unreachable_server_is_a_clear_error_without_the_password(
    postgres: PostgresServer,
) -> None:
    url = "postgresql://energy:s3cret@127.0.0.1:1/energy"
    with pytest.raises(StoreError) as err:
        RequestStore.open(url, busy_timeout_s=1.0)
    msg = str(err.value)
    assert "s3cret" not in msg
    assert "postgresql://energy@127.0.0.1:1/energy" in msg
    assert "is PostgreSQL running" in msg


def test_two_stores_share_records_rollups_and_labels(pg_url: str) -> None:
    n = 400
    with RequestStore.open(pg_url) as a, RequestStore.open(pg_url) as b:

        def write(store: RequestStore, first: int) -> None:
            for i in range(first, first + n):
                # The same hours, models and categories from both: the rollup rows collide.
                store.add(make_record(rid(i), model=f"m{i % 3}", finished_at=3600.0 + i))

        threads = [
            threading.Thread(target=write, args=(a, 0)),
            threading.Thread(target=write, args=(b, n)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert a.flush() and b.flush()
        assert a.get(rid(n + 5)) is not None  # written by b, found through a
        assert b.get(rid(5)) is not None
        for store in (a, b):
            rows = store.summary()
            assert sum(r["count"] for r in rows) == 2 * n
            assert {r["model"] for r in rows} == {"m0", "m1", "m2"}


def test_a_batch_written_twice_is_counted_once(pg_url: str) -> None:
    """A commit whose answer is lost with the connection is retried: its records are
    already there, and the rollups must not count them again."""
    db = PostgresDatabase(pg_url, max_bytes=10**9)
    batch = [make_record(rid(i), joules=2.0) for i in range(10)]
    try:
        for _ in range(2):
            written = db.write(batch)
            db.commit()
        assert written.duplicates == 10 and not written.rejected
        sums = db.sums(None, None)
        assert [(s.count, s.joules) for s in sums.values()] == [(10, 20.0)]
        assert db.count() == 10
    finally:
        db.close_writer()
        db.close_reader()


def test_a_restart_mid_run_loses_no_record(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=STORE_LOG)
    server = PostgresServer()
    with server as url:
        added = 0
        with fast(url, batch_records=50, linger_s=0.01) as store:
            for i in range(300):
                store.add(make_record(rid(i), finished_at=3600.0 + i))
            added = 300
            assert store.flush()
            server.stop()
            for i in range(300, 800):
                store.add(make_record(rid(i), finished_at=3600.0 + i))
                added += 1
            wait_until(lambda: not store.status().writing)
            st = store.status()
            assert st.queued > 0 and st.dropped == 0
            assert store.get(rid(700)) is not None  # answered requests are found meanwhile
            with pytest.raises(StoreError, match="is PostgreSQL running"):
                store.db.count()  # reads that need the database say so
            time.sleep(0.5)  # a few failed attempts
            server.start()
            assert store.flush(timeout_s=60)
            assert store.status().writing and store.status().last_error is None
            assert store.count() == added
            assert store.dropped == 0
            assert sum(r["count"] for r in store.summary()) == added
        messages = [r.getMessage() for r in caplog.records]
        assert any("retrying" in m for m in messages)
        assert any("writing again" in m for m in messages)


def test_records_beyond_the_queue_are_dropped_and_counted_while_it_is_away() -> None:
    server = PostgresServer()
    with (
        server as url,
        fast(url, max_queue_records=100, batch_records=20, linger_s=0.01) as store,
    ):
        server.stop()
        for i in range(250):
            store.add(make_record(rid(i)))
        assert store.dropped == 150
        assert store.status().queued == 100
        server.start()
        assert store.flush(timeout_s=60)
        assert store.count() == 100
        assert store.status().dropped == 150


def test_the_size_limit_keeps_the_newest_records(pg_url: str) -> None:
    max_records = 1000
    with RequestStore.open(
        pg_url, max_mb=max_records * BYTES_PER_RECORD / 1e6, maintain_every_s=0.0
    ) as store:
        for i in range(3000):
            store.add(make_record(rid(i), finished_at=1000.0 + i))
        assert store.flush()
        store.add(make_record(rid(3000), finished_at=5000.0))  # one more write, then upkeep
        assert store.flush()
        # Kept at each upkeep (here after every write): the newest max_records.
        wait_until(lambda: store.count() <= max_records)
        assert store.count() == max_records
        assert store.count() + store.evicted == 3001
        assert store.get(rid(3000)) is not None and store.get(rid(0)) is None
        assert sum(r["count"] for r in store.summary()) == 3001
