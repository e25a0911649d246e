"""The request store's SQLite file: schema, migration, size limit, the disk refusing."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from metering.store import RequestRecord, RequestStore, StoreError
from metering.store.columns import COLUMNS, COLUMNS_V4, COLUMNS_V5, COLUMNS_V6, encode
from metering.store.sqlite import SqliteDatabase
from metering.store.sqlite_schema import MIGRATIONS, SCHEMA_VERSION, rebuild_rollups
from tests.support.paths import REPO_ROOT
from tests.support.polling import wait_until
from tests.support.storekit import STORE_LOG, make_record, make_report, rid

REPO = REPO_ROOT


@contextmanager
def locked(path: Path) -> Iterator[sqlite3.Connection]:
    """Another connection holding the write lock, as a backup tool or second process might."""
    c = sqlite3.connect(path, isolation_level=None)
    try:
        c.execute("BEGIN EXCLUSIVE")
        yield c
    finally:
        if c.in_transaction:
            c.execute("ROLLBACK")
        c.close()


# Quick retries and lock waits, so failure tests run fast; waits stay bounded.
def fast_store(db: Path, **kw: Any) -> RequestStore:
    return RequestStore.open(
        str(db), busy_timeout_s=0.02, retry_initial_s=0.01, retry_max_s=0.05, **kw
    )


def test_schema_wal_and_no_figure_stored_twice(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    with RequestStore.open(str(db)) as store:
        store.add(make_record(rid(1), client_request_id="c1"))
        assert store.flush()
        with closing(sqlite3.connect(db)) as c:
            assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 8
            assert c.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
            tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            assert tables == {"labels", "records", "rollups", "rollups_daily", "tenant_usage"}
            cols = [r[1] for r in c.execute("PRAGMA table_info(records)")]
            assert tuple(cols) == COLUMNS  # no energy JSON, no SCI, no per-source copy
            row = c.execute("SELECT rid, finished_ms, model, status FROM records").fetchone()
            assert row[0] == bytes.fromhex(rid(1)[4:]) and len(row[0]) == 12
            assert row[1] == 1_000_000 and isinstance(row[2], int) and row[3] == 200
            labels = {t for (t,) in c.execute("SELECT text FROM labels")}
            assert {"m1", "code", "fake", "constant", "queue", "static", "", "chat"} <= labels


def test_a_record_is_under_its_byte_budget(tmp_path: Path) -> None:
    """The README's budget: at most 300 bytes a record on disk, indexes and rollups
    included (bench/store.py measures it at a million)."""
    db = tmp_path / "store.db"
    n = 20_000
    with RequestStore.open(str(db), batch_records=1000) as store:
        for i in range(n):
            store.add(
                make_record(
                    f"req-{os.urandom(12).hex()}",
                    finished_at=1_764_000_000 + i * 0.01,
                    joules=i * 0.37,
                    zone="DE",
                    age_s=i * 0.001,
                    cpu_j=i * 0.01,
                )
            )
        assert store.flush()
    with closing(sqlite3.connect(db)) as c:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert db.stat().st_size / n <= 300


def test_a_batch_over_sqlites_variable_limit_is_split_into_statements(tmp_path: Path) -> None:
    database = SqliteDatabase(str(tmp_path / "r.db"), max_bytes=10**8)
    database._w.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 2 * len(COLUMNS) + 1)
    with RequestStore(database, linger_s=60.0, batch_records=100) as store:
        # 7 records, 2 per statement; the last one repeats an id: the first stays.
        for i in range(6):
            store.add(make_record(rid(i), joules=float(i)))
        store.add(make_record(rid(0), joules=99.0))
        assert store.flush()
        assert store.count() == 6
        got = store.get(rid(0))
        assert got is not None and got["joules"] == 0.0
        assert [r["count"] for r in store.summary()] == [6]


# --- migration --------------------------------------------------------------------------


def _v2_database(path: Path, reports: list[Any]) -> None:
    """A store as energy-proxy wrote it before schema 3: every figure in columns and again
    in the energy JSON."""
    with closing(sqlite3.connect(path, isolation_level=None)) as c:
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("BEGIN")
        for m in MIGRATIONS[:2]:
            m(c)
        c.execute("PRAGMA user_version = 2")
        for i, (rep, tenant, status) in enumerate(reports):
            c.execute(
                "INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                "?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rep.request_id,
                    3600.0 * i + 0.25,
                    rep.model,
                    "fake",
                    rep.category,
                    status,
                    rep.duration_s,
                    rep.tokens.prompt,
                    rep.tokens.completion,
                    rep.tokens.source,
                    rep.energy_j,
                    rep.gpu_j,
                    rep.cpu_j,
                    rep.dynamic_j,
                    json.dumps({"constant": rep.energy_j}),
                    rep.method,
                    rep.intensity.g_per_kwh,
                    rep.intensity.source,
                    rep.co2eq_g,
                    rep.embodied_g,
                    rep.sci_g,
                    json.dumps(rep.to_dict()),
                    tenant,
                    rep.client_request_id,
                ),
            )
        c.execute("COMMIT")


def test_a_version_2_store_is_migrated_with_every_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=STORE_LOG)
    db = tmp_path / "old.db"
    reports = [
        (make_report(rid(1), joules=0.1 + 0.2), "", 200),
        (make_report("client-made-id", zone="FR", age_s=5.5, cpu_j=1.0), "t", 200),
        (make_report(rid(3), client_request_id="c3", attribution="", prompt_tokens=None), "", 499),
        (make_report("elevenchars", joules=2.0), "", 200),  # its key needs the padding
    ]
    _v2_database(db, reports)
    with RequestStore.open(str(db)) as store:
        assert store.count() == 4
        for rep, tenant, _ in reports:
            assert store.get(rep.request_id) == rep.to_dict()
            assert store.get(rep.request_id, tenant) == rep.to_dict()
        assert store.get("c3") == reports[2][0].to_dict()
        rows = store.summary()
        assert [(r["category"], r["count"]) for r in rows] == [("code", 3)]
        assert rows[0]["mean_joules"] == pytest.approx((0.1 + 0.2 + 10.0 + 2.0) / 3)
    with closing(sqlite3.connect(db)) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert c.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        assert not c.execute("SELECT 1 FROM sqlite_master WHERE name = 'requests'").fetchone()
    assert any("compacting 4 records" in r.getMessage() for r in caplog.records)


def _old_database(
    path: Path, records: list[RequestRecord], version: int, columns: tuple[str, ...]
) -> None:
    """A store as energy-proxy wrote it at schema `version`, with that version's columns."""
    with closing(sqlite3.connect(path, isolation_level=None)) as c:
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("BEGIN")
        for m in MIGRATIONS[:version]:
            m(c)
        c.execute(f"PRAGMA user_version = {version}")

        def label(text: str) -> int:
            c.execute("INSERT OR IGNORE INTO labels (text) VALUES (?)", (text,))
            return int(c.execute("SELECT id FROM labels WHERE text = ?", (text,)).fetchone()[0])

        marks = ", ".join("?" for _ in columns)
        for r in records:
            row = encode(r, label)[: len(columns)]
            c.execute(f"INSERT INTO records ({', '.join(columns)}) VALUES ({marks})", row)
        rebuild_rollups(c)
        c.execute("COMMIT")


def _v4_database(path: Path, records: list[RequestRecord]) -> None:
    """A store as energy-proxy wrote it at schema 4: no endpoint, no untracked flag."""
    _old_database(path, [replace(r, embodied_basis="") for r in records], 4, COLUMNS_V4)


def test_a_version_5_store_reads_back_its_records_without_an_embodied_basis(
    tmp_path: Path,
) -> None:
    db = tmp_path / "v5.db"
    old = [make_record(rid(1)), replace(make_record(rid(2)), endpoint="rerank")]
    _old_database(db, old, 5, COLUMNS_V5)
    with RequestStore.open(str(db)) as store:
        for r in old:
            got = store.get(r.request_id)
            assert got == r.energy()  # every figure as it was told
            assert got is not None and got["embodied_basis"] is None
        store.add(replace(make_record(rid(3)), embodied_basis="318 kgCO2eq over 4 years: ..."))
        assert store.flush()
        got = store.get(rid(3))
        assert got is not None and got["embodied_basis"] == "318 kgCO2eq over 4 years: ..."
    with closing(sqlite3.connect(db)) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        cols = [r[1] for r in c.execute("PRAGMA table_info(records)")]
        assert tuple(cols) == COLUMNS


def test_a_version_7_store_reads_back_its_records_as_not_routed(tmp_path: Path) -> None:
    db = tmp_path / "v7.db"
    old = [make_record(rid(1)), make_record(rid(2), status=502)]
    _old_database(db, old, 7, COLUMNS_V6)
    with RequestStore.open(str(db)) as store:
        for r in old:
            got = store.get(r.request_id)
            assert got == r.energy()
            back = store.db.get(r.request_id, None)
            assert back is not None and back.route == ""
        store.add(replace(make_record(rid(3)), route="energy/lowest"))
        assert store.flush()
        back = store.db.get(rid(3), None)
        assert back is not None and back.route == "energy/lowest"
    with closing(sqlite3.connect(db)) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        cols = [r[1] for r in c.execute("PRAGMA table_info(records)")]
        assert tuple(cols) == COLUMNS


def test_a_version_4_store_reads_back_its_records_as_chat(tmp_path: Path) -> None:
    db = tmp_path / "v4.db"
    old = [make_record(rid(1)), make_record(rid(2), status=499, client_request_id="c2")]
    _v4_database(db, old)
    with RequestStore.open(str(db)) as store:
        for r in old:
            got = store.get(r.request_id)
            assert got == r.energy()  # every figure as it was told
            assert got is not None
            assert got["endpoint"] == "chat" and got["shared_with_untracked"] is None
        # New records beside them keep their own endpoint.
        store.add(replace(make_record(rid(3)), endpoint="rerank", shared_with_untracked=True))
        assert store.flush()
        got = store.get(rid(3))
        assert got is not None
        assert got["endpoint"] == "rerank" and got["shared_with_untracked"] is True
        assert [r["count"] for r in store.summary()] == [2]
    with closing(sqlite3.connect(db)) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        cols = [r[1] for r in c.execute("PRAGMA table_info(records)")]
        assert tuple(cols) == COLUMNS


@pytest.mark.parametrize("endpoint", ["responses", "messages", "audio", "score", "pooling"])
@pytest.mark.parametrize("with_untracked", [True, False, None])
def test_every_endpoint_and_untracked_flag_round_trips(
    tmp_path: Path, endpoint: str, with_untracked: bool | None
) -> None:
    record = replace(make_record(rid(1)), endpoint=endpoint, shared_with_untracked=with_untracked)
    with RequestStore.open(str(tmp_path / "s.db")) as store:
        store.add(record)
        assert store.flush()
        got = store.get(rid(1))
    assert got == record.energy()
    assert got is not None
    assert got["endpoint"] == endpoint and got["shared_with_untracked"] is with_untracked


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    RequestStore.open(str(db)).close()
    with closing(sqlite3.connect(db)) as c:
        c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        c.commit()
    with pytest.raises(StoreError, match="newer"):
        RequestStore.open(str(db))


def test_corrupt_file_is_refused_at_open(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    db.write_bytes(b"definitely not an SQLite database\x00\xff" * 200)
    with pytest.raises(StoreError, match="not a database"):
        RequestStore.open(str(db))


def test_someone_elses_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    with closing(sqlite3.connect(db)) as c:
        c.execute("CREATE TABLE customers (name TEXT)")
        c.commit()
    with pytest.raises(StoreError, match="new file"):
        RequestStore.open(str(db))


def test_unwritable_directory_is_refused_at_open(tmp_path: Path) -> None:
    # A regular file where the directory should be: fails for root too, unlike chmod.
    (tmp_path / "notadir").write_text("x")
    with pytest.raises(StoreError, match="directory"):
        RequestStore.open(str(tmp_path / "notadir" / "store.db"))


def test_locked_database_is_refused_at_open(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    RequestStore.open(str(db)).close()
    with locked(db), pytest.raises(StoreError, match="locked"):
        RequestStore.open(str(db), busy_timeout_s=0.02)


# --- failures and the size limit -----------------------------------------------------------


def test_failing_write_is_retried_and_lands(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "store.db"
    caplog.set_level(logging.WARNING, logger=STORE_LOG)
    with fast_store(db) as store:
        with locked(db):
            for i in range(50):
                store.add(make_record(rid(i)))
            wait_until(lambda: any("retrying" in r.getMessage() for r in caplog.records))
            st = store.status()
            assert st.queued == 50 and not st.writing and "locked" in (st.last_error or "")
            assert store.get(rid(3)) == make_report(rid(3)).to_dict()  # still answerable
            assert not store.flush(timeout_s=0.05)  # cannot land while the lock is held
        assert store.flush()
        assert store.count() == 50
        assert store.dropped == 0
        assert store.status().writing
    # One warning when the outage began, one when it ended: not one per attempt.
    messages = [r.getMessage() for r in caplog.records]
    assert sum("retrying" in m for m in messages) == 1
    assert sum("writing again" in m for m in messages) == 1


def test_queue_is_bounded_and_drops_are_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "store.db"
    caplog.set_level(logging.WARNING, logger=STORE_LOG)
    with fast_store(db, max_queue_records=10) as store:
        with locked(db):
            for i in range(15):
                store.add(make_record(rid(i)))
            assert store.dropped == 5
            assert store.queued == 10
            wait_until(lambda: any("dropped" in r.getMessage() for r in caplog.records))
        assert store.flush()
        assert store.count() == 10
        assert store.get(rid(9)) is not None
        assert store.get(rid(10)) is None


def test_close_gives_up_loudly_when_the_disk_stays_unwritable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "s.db"
    caplog.set_level(logging.WARNING, logger=STORE_LOG)
    store = fast_store(db)
    with locked(db):
        for i in range(30):
            store.add(make_record(rid(i)))
        store.close(timeout_s=0.1)
    assert store.dropped == 30
    assert any("lost" in r.getMessage() for r in caplog.records)


def test_the_file_stays_under_its_limit_and_the_rollups_keep_counting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=STORE_LOG)
    db = tmp_path / "small.db"
    n = 30_000  # ~5 MB of records against a 1 MB limit
    with RequestStore.open(str(db), max_mb=1, batch_records=500) as store:
        for i in range(n):
            store.add(make_record(rid(i), finished_at=1000.0 + i))
        assert store.flush()
        kept = store.count()
        assert store.evicted > 0 and kept + store.evicted == n
        assert store.dropped == 0
        assert store.get(rid(n - 1)) is not None  # the newest stay
        assert store.get(rid(0)) is None  # the oldest went first
        assert [r["count"] for r in store.summary()] == [n]  # nothing lost from the counts
        assert db.stat().st_size <= 1_000_000
    assert any("oldest records" in r.getMessage() for r in caplog.records)
    # A lower limit at the next start drops more and gives the space back to the disk.
    with RequestStore.open(str(db), max_mb=1) as store:
        assert [r["count"] for r in store.summary()] == [n]
    size_before = db.stat().st_size
    with closing(sqlite3.connect(db)) as c:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with RequestStore.open(str(db), max_mb=1) as store:
        assert store.count() == kept
    assert db.stat().st_size <= size_before


def test_a_filesystem_that_refuses_writes_costs_records_not_the_store(tmp_path: Path) -> None:
    """A process whose files may not grow past 300 kB (RLIMIT_FSIZE: what a full disk does
    to SQLite's writes): adding never fails or blocks, the status says why nothing is
    written, drops are counted beyond the queue, and once the limit is lifted the queue is
    written."""
    script = textwrap.dedent(
        f"""
        import json, os, resource, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from tests.support.storekit import make_record
        from metering.store import RequestStore
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, resource.RLIM_INFINITY))
        store = RequestStore.open(sys.argv[1], max_mb=100, max_queue_records=500,
                                  retry_initial_s=0.01, retry_max_s=0.05)
        for i in range(6000):
            store.add(make_record("req-" + os.urandom(12).hex(), finished_at=1000.0 + i))
            if i % 500 == 0:
                time.sleep(0.05)  # let the writer run into the limit
        full = store.status().to_dict()
        counted = sum(r["count"] for r in store.summary())
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        flushed = store.flush(30)
        after = store.status().to_dict()
        print(json.dumps({{"full": full, "flushed": flushed, "after": after,
                           "counted": counted, "stored": store.count()}}))
        store.close()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "s.db")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    full, after = out["full"], out["after"]
    assert not full["ok"] and "disk I/O error" in full["error"]
    assert full["queued"] == 500 and full["dropped"] > 0
    assert out["flushed"] and after["ok"] and after["queued"] == 0 and after["error"] is None
    assert out["stored"] + after["dropped"] == 6000
    assert out["counted"] == out["stored"]  # the summary counted what was kept, no more


def test_an_absurd_count_is_refused_alone_and_the_store_goes_on(tmp_path: Path) -> None:
    """2**63 - 1 tokens beside normal records in one batch: that record is refused (its
    sums would overflow SQLite's INTEGER), the others and every later one are stored."""
    with RequestStore.open(str(tmp_path / "r.db")) as store:
        store.add(make_record(rid(1)))
        store.add(replace(make_record(rid(2)), completion_tokens=2**63 - 1))
        store.add(replace(make_record(rid(3)), joules=float("inf")))
        store.add(make_record(rid(4)))
        assert store.flush()
        assert store.get(rid(2)) is None and store.get(rid(3)) is None
        assert store.get(rid(1)) is not None and store.get(rid(4)) is not None
        assert store.dropped == 2 and store.status().writing
        store.add(make_record(rid(5)))
        assert store.flush() and store.get(rid(5)) is not None
        assert [r["count"] for r in store.summary()] == [3]


def test_the_size_limit_holds_the_write_ahead_log_too(tmp_path: Path) -> None:
    """--db-max-mb 1: the file and its WAL together stay under 1 MB while records keep
    coming (they were 1.00 MB and 4.34 MB); the oldest are dropped for room."""
    path = tmp_path / "r.db"
    wal = Path(f"{path}-wal")
    with RequestStore.open(str(path), max_mb=1.0) as store:
        for i in range(12_000):
            store.add(make_record(rid(i + 1), finished_at=1000.0 + i))
            if i % 400 == 399:
                assert store.flush()
                on_disk = path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
                assert on_disk <= 1_000_000, (i, on_disk)
        assert store.status().evicted > 0 and store.get(rid(12_000)) is not None
