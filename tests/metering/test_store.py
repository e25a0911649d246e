"""The request store over a real SQLite file: durability, the write queue, failures, math."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest

from metering.report import EnergyReport, Intensity, Tokens
from metering.store import SCHEMA_VERSION, RequestRecord, RequestStore, StoreError

STORE_LOG = "energy_proxy.store"


def make_report(
    request_id: str,
    *,
    model: str = "m1",
    category: str = "code",
    joules: float = 10.0,
    completion_tokens: int = 5,
    prompt_tokens: int | None = 3,
    co2eq_g: float = 0.001,
) -> EnergyReport:
    return EnergyReport(
        request_id=request_id,
        model=model,
        category=category,
        duration_s=0.5,
        tokens=Tokens(prompt_tokens, completion_tokens, "backend"),
        energy_j=joules,
        gpu_j=joules * 0.75,
        cpu_j=None,
        dynamic_j=joules / 2,
        method="constant",
        intensity=Intensity(500.0, "static"),
        co2eq_g=co2eq_g,
        embodied_g=0.0001,
        sci_g=co2eq_g + 0.0001,
    )


def make_record(
    request_id: str, *, status: int = 200, finished_at: float = 1000.0, **kw: Any
) -> RequestRecord:
    rep = make_report(request_id, **kw)
    return RequestRecord.from_report(
        rep,
        backend="fake",
        status=status,
        finished_at=finished_at,
        joules_by_source={"constant": rep.energy_j},
    )


def wait_until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def raw_count(path: Path) -> int:
    with closing(sqlite3.connect(path)) as c:
        return int(c.execute("SELECT COUNT(*) FROM requests").fetchone()[0])


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
    return RequestStore(str(db), busy_timeout_s=0.02, retry_initial_s=0.01, retry_max_s=0.05, **kw)


def test_round_trip_returns_the_exact_energy_object(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    rep = make_report("r1", joules=0.1 + 0.2, co2eq_g=1 / 3)
    rec = RequestRecord.from_report(
        rep, backend="fake", status=200, finished_at=1234.5, joules_by_source={"nvml:0": 0.3}
    )
    with RequestStore.open(str(db)) as store:
        store.add(rec)
        assert store.flush()
        assert raw_count(db) == 1
        got = store.get("r1")
        assert got == rep.to_dict()
        assert store.get("nope") is None
    with closing(sqlite3.connect(db)) as c:
        c.row_factory = sqlite3.Row
        row = c.execute("SELECT * FROM requests").fetchone()
    assert row["finished_at"] == 1234.5
    assert row["backend"] == "fake"
    assert row["status"] == 200
    assert row["joules"] == 0.1 + 0.2
    assert row["cpu_joules"] is None
    assert row["joules_by_source"] == '{"nvml:0":0.3}'
    assert row["completion_tokens"] == 5
    assert row["prompt_tokens"] == 3


def test_restart_keeps_records(tmp_path: Path) -> None:
    db = str(tmp_path / "sub" / "dir" / "store.db")  # parent directories are created
    with RequestStore(db) as store:
        for i in range(20):
            store.add(make_record(f"r{i}"))
    with RequestStore(db) as store:
        assert store.count() == 20
        assert store.get("r7") == make_report("r7").to_dict()


def test_queued_records_are_visible_to_get(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    # A long linger keeps the record in the queue until someone flushes.
    with RequestStore(str(db), linger_s=60.0, batch_records=1000) as store:
        store.add(make_record("q1"))
        assert store.queued == 1
        assert raw_count(db) == 0
        assert store.get("q1") == make_report("q1").to_dict()
        assert store.flush()
        assert store.queued == 0
        assert raw_count(db) == 1
        assert store.get("q1") == make_report("q1").to_dict()


def test_same_request_id_replaces(tmp_path: Path) -> None:
    with RequestStore(str(tmp_path / "s.db")) as store:
        store.add(make_record("r", joules=1.0))
        store.add(make_record("r", joules=2.0))
        assert store.count() == 1
        got = store.get("r")
        assert got is not None and got["joules"] == 2.0


def test_a_batch_over_sqlites_variable_limit_is_split_into_statements(tmp_path: Path) -> None:
    from metering.store import _COLUMNS, _connect, _insert_batch

    RequestStore.open(tmp_path / "r.db").close()  # creates the schema
    with closing(_connect(str(tmp_path / "r.db"), 5.0)) as conn:
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 2 * len(_COLUMNS) + 1)
        # 7 records, 2 per statement; the last one repeats an id and must replace it.
        batch = [make_record(f"r{i}", joules=float(i)) for i in range(6)]
        batch.append(make_record("r0", joules=99.0))
        _insert_batch(conn, batch)
    with closing(sqlite3.connect(tmp_path / "r.db")) as c:
        rows = dict(c.execute("SELECT request_id, joules FROM requests").fetchall())
    assert rows == {"r0": 99.0, "r1": 1.0, "r2": 2.0, "r3": 3.0, "r4": 4.0, "r5": 5.0}


def test_wal_mode_and_schema_version(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    with RequestStore(str(db)):
        with closing(sqlite3.connect(db)) as c:
            assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            indexes = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"requests_finished_at", "requests_model_category"} <= indexes


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    RequestStore(str(db)).close()
    with closing(sqlite3.connect(db)) as c:
        c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        c.commit()
    with pytest.raises(StoreError, match="newer"):
        RequestStore(str(db))


def test_corrupt_file_is_refused_at_open(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    db.write_bytes(b"definitely not an SQLite database\x00\xff" * 200)
    with pytest.raises(StoreError, match="not a database"):
        RequestStore(str(db))


def test_someone_elses_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    with closing(sqlite3.connect(db)) as c:
        c.execute("CREATE TABLE customers (name TEXT)")
        c.commit()
    with pytest.raises(StoreError, match="new file"):
        RequestStore(str(db))


def test_unwritable_directory_is_refused_at_open(tmp_path: Path) -> None:
    # A regular file where the directory should be: fails for root too, unlike chmod.
    (tmp_path / "notadir").write_text("x")
    with pytest.raises(StoreError, match="directory"):
        RequestStore(str(tmp_path / "notadir" / "store.db"))
    with pytest.raises(StoreError):
        RequestStore(str(tmp_path / "notadir" / "deeper" / "store.db"))


def test_locked_database_is_refused_at_open(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    RequestStore(str(db)).close()
    with locked(db), pytest.raises(StoreError, match="locked"):
        RequestStore(str(db), busy_timeout_s=0.02)
    # A fresh (rollback-journal) database locked by another program.
    plain = tmp_path / "plain.db"
    sqlite3.connect(plain).close()
    with locked(plain), pytest.raises(StoreError, match="locked"):
        RequestStore(str(plain), busy_timeout_s=0.02)


def test_concurrent_writers_all_land_while_readers_read(tmp_path: Path) -> None:
    n_threads, per_thread = 8, 300
    errors: list[BaseException] = []
    stop = threading.Event()
    with RequestStore(str(tmp_path / "store.db"), batch_records=50) as store:

        def writer(t: int) -> None:
            for i in range(per_thread):
                store.add(make_record(f"t{t}-{i}", model=f"m{t % 2}"))

        def reader() -> None:
            try:
                while not stop.is_set():
                    store.get("t0-0")
                    store.summary(flush_timeout_s=0.0)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        readers = [threading.Thread(target=reader) for _ in range(2)]
        writers = [threading.Thread(target=writer, args=(t,)) for t in range(n_threads)]
        for th in [*readers, *writers]:
            th.start()
        for th in writers:
            th.join(timeout=30.0)
        stop.set()
        for th in readers:
            th.join(timeout=30.0)
        assert not errors
        assert store.flush()
        assert store.count() == n_threads * per_thread
        assert store.dropped == 0
        for t in range(n_threads):
            assert store.get(f"t{t}-{per_thread - 1}") is not None
        assert sum(r["count"] for r in store.summary()) == n_threads * per_thread


def test_failing_write_is_retried_and_lands(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "store.db"
    caplog.set_level(logging.WARNING, logger=STORE_LOG)
    with fast_store(db) as store:
        with locked(db):
            for i in range(50):
                store.add(make_record(f"r{i}"))
            wait_until(
                lambda: any("retrying" in r.getMessage() for r in caplog.records),
            )
            assert store.queued == 50
            assert store.get("r3") == make_report("r3").to_dict()  # still answerable
            assert not store.flush(timeout_s=0.05)  # cannot land while the lock is held
        assert store.flush()
        assert store.count() == 50
        assert store.dropped == 0
    assert all(r.name == STORE_LOG for r in caplog.records)


def test_record_sqlite_cannot_take_is_dropped_loudly_the_rest_land(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=STORE_LOG)
    bad = make_record("bad")
    bad.energy["oops"] = object()  # not JSON: simulates a bug upstream of the store
    with RequestStore(str(tmp_path / "s.db"), linger_s=60.0) as store:
        store.add(make_record("a"))
        store.add(bad)
        store.add(make_record("b"))
        assert store.flush()
        assert store.count() == 2
        assert store.dropped == 1
        assert store.get("a") is not None and store.get("b") is not None
        assert store.get("bad") is None
    assert any("bad" in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records)


def test_queue_is_bounded_and_drops_are_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "store.db"
    caplog.set_level(logging.WARNING, logger=STORE_LOG)
    with fast_store(db, max_queue_records=10) as store:
        with locked(db):
            for i in range(15):
                store.add(make_record(f"r{i}"))
            assert store.dropped == 5
            assert store.queued == 10
            wait_until(lambda: any("dropped" in r.getMessage() for r in caplog.records))
        assert store.flush()
        assert store.count() == 10
        assert store.get("r9") is not None
        assert store.get("r10") is None


def test_summary_math_by_hand(tmp_path: Path) -> None:
    with RequestStore(str(tmp_path / "s.db")) as store:
        # m1/code: 10, 20, 30 J over 5, 5, 10 completion tokens -> 60 J / 20 tokens.
        store.add(make_record("a1", joules=10.0, completion_tokens=5, co2eq_g=1.0))
        store.add(make_record("a2", joules=20.0, completion_tokens=5, co2eq_g=2.0))
        store.add(make_record("a3", joules=30.0, completion_tokens=10, co2eq_g=6.0))
        # Not successful: left out everywhere.
        store.add(make_record("a4", status=499, joules=1000.0, completion_tokens=1))
        store.add(make_record("a5", status=502, joules=1000.0, completion_tokens=1))
        # m1/other: an embedding (prompt tokens count) and one with no tokens at all, which
        # counts in mean_joules but not in J/token: 4 J / 8 tokens.
        store.add(
            make_record(
                "e1",
                category="other",
                joules=4.0,
                completion_tokens=0,
                prompt_tokens=8,
                co2eq_g=0.5,
            )
        )
        store.add(
            make_record(
                "e2",
                category="other",
                joules=6.0,
                completion_tokens=0,
                prompt_tokens=None,
                co2eq_g=1.5,
            )
        )
        # m2/code: no tokens anywhere -> J/token is None.
        store.add(
            make_record(
                "z1", model="m2", joules=3.0, completion_tokens=0, prompt_tokens=0, co2eq_g=0.25
            )
        )
        rows = store.summary()
        assert rows == [
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
        assert [(r["model"], r["category"]) for r in store.summary(min_count=2)] == [
            ("m1", "code"),
            ("m1", "other"),
        ]
        assert store.summary(min_count=4) == []


def test_summary_includes_records_still_queued(tmp_path: Path) -> None:
    with RequestStore(str(tmp_path / "s.db"), linger_s=60.0, batch_records=1000) as store:
        store.add(make_record("a", joules=7.0))
        assert [r["count"] for r in store.summary()] == [1]


def test_prune_by_age_with_injected_clock(tmp_path: Path) -> None:
    now_s = [10_000.0]
    with RequestStore(str(tmp_path / "s.db"), clock=lambda: now_s[0]) as store:
        for i, t in enumerate([100.0, 200.0, 300.0, 9_000.0]):
            store.add(make_record(f"r{i}", finished_at=t))
        assert store.prune(older_than_s=10_000.0 - 250.0) == 2  # finished before 250
        assert store.count() == 2
        assert store.get("r0") is None and store.get("r2") is not None
        assert store.prune(older_than_s=10_000.0 - 250.0) == 0
        now_s[0] = 20_000.0
        assert store.prune(older_than_s=86_400.0) == 0
        assert store.prune(older_than_s=0.0) == 2
        assert store.count() == 0


def test_close_flushes_everything_queued(tmp_path: Path) -> None:
    db = str(tmp_path / "s.db")
    n = 1_000
    store = RequestStore(db, linger_s=60.0, batch_records=64)
    for i in range(n):
        store.add(make_record(f"r{i}"))
    store.close()
    with RequestStore(db) as again:
        assert again.count() == n


def test_close_is_idempotent_and_later_adds_are_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=STORE_LOG)
    store = RequestStore(str(tmp_path / "s.db"))
    store.close()
    store.close()
    store.add(make_record("late"))  # must not raise on the request path
    store.add(make_record("later"))
    assert store.dropped == 2
    assert sum("closed" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(StoreError, match="closed"):
        store.get("late")


def test_close_gives_up_loudly_when_the_disk_stays_unwritable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "s.db"
    caplog.set_level(logging.WARNING, logger=STORE_LOG)
    store = fast_store(db)
    with locked(db):
        for i in range(30):
            store.add(make_record(f"r{i}"))
        store.close(timeout_s=0.1)
    assert store.dropped == 30
    assert any("lost" in r.getMessage() for r in caplog.records)
