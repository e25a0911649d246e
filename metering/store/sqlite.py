"""The request store's embedded database: one SQLite file, WAL, bounded in size.

Schema (version 3): `labels` (id, text) holds each label value once; `records` holds one
compact row per request (`columns.py`): about 190 bytes with its index, measured by
bench/store.py; `rollups` (WITHOUT ROWID, keyed by hour x model group x category x
backend x tenant) holds what summaries read.

The size limit is SQLite's own: `PRAGMA max_page_count` on the writer's connection makes
the file refuse to grow past `--db-max-mb` with SQLITE_FULL, as a full disk does; the store
then drops the oldest records (`make_room`) and writes again into the pages they freed. So
the file never grows past the limit, a full disk is handled the same way, and the rollups
keep counting what was dropped. The limit holds the write-ahead log as well: a fifth of it
(64 KiB to 16 MiB, at most a 16th of the disk) is the log's, checkpointed at half that and
cut back after (`wal_budget_bytes`); the file's page limit is the rest. What a full disk
needs beyond that (a reserve, room made early) is `full_disk.py`'s.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from metering.store.columns import COLUMNS, TENANT, decode
from metering.store.database import (
    DATA_ERRORS,
    WRITE_CHUNK_RECORDS,
    Written,
    encode_all,
    screen,
)
from metering.store.full_disk import (
    MAKE_ROOM_FRACTION,
    MIN_MAKE_ROOM_ROWS,
    FullDisk,
    disk_bytes,
    is_full,
    wal_budget_bytes,
)
from metering.store.records import RequestRecord, StoreError, id_key
from metering.store.rollup import (
    HOURS_PER_DAY,
    SECONDS_PER_HOUR,
    RollupKey,
    Span,
    Sums,
    by_day,
    rollup,
    tenant_hours,
)
from metering.store.sqlite_schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    SELECT_RECORD,
    connect,
    explain,
    insert_records_sql,
    rollback,
    transaction,
    upsert_rollups_sql,
    upsert_tenant_usage_sql,
)

log = logging.getLogger("energy_proxy.store")

_SQL_DATA_ERRORS: tuple[type[Exception], ...] = (
    *DATA_ERRORS,
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,  # a value of a type SQLite cannot bind
    sqlite3.DataError,
)
_PRUNE_CHUNK_ROWS = 10_000  # rows per delete transaction, so the writer never waits long
_WRITER_CACHE_KIB = 64 * 1024  # the id index's pages stay in memory up to ~2.5 M records
MIN_MAX_BYTES = 1_000_000  # --db-max-mb 1


# --- the database ------------------------------------------------------------------------


class SqliteDatabase:
    """One SQLite file: a writer connection (the store's writer thread) and a reader
    connection behind a lock (any thread)."""

    kind = "sqlite"

    def __init__(self, path: str, *, max_bytes: int, busy_timeout_s: float = 5.0) -> None:
        """Open (creating if needed) and migrate the database at `path`; drop the oldest
        records if it is already larger than `max_bytes`. Raises `StoreError` if that is
        impossible (a corrupt file, an unwritable path, a locked database, a newer schema)."""
        if max_bytes < MIN_MAX_BYTES:
            raise ValueError(f"the size limit must be at least {MIN_MAX_BYTES} bytes")
        if path == ":memory:" or path.startswith("file:"):
            raise StoreError(
                f"request store {path!r}: give --db a file path (records must outlive the "
                "process), or a postgresql:// URL"
            )
        self.path = self.where = str(Path(path).expanduser())
        self.max_bytes = max_bytes
        self._rlock = threading.Lock()
        self._ids: dict[str, int] = {}  # label text -> id (the writer's, committed)
        self._staged: dict[str, int] = {}  # label ids of the open transaction
        self._texts: dict[int, str] = {}  # label id -> text (the reader's)
        self._text_ids: dict[str, int] = {}  # label text -> id (the reader's)
        self._wal_bytes = wal_budget_bytes(max_bytes, disk_bytes(self.path))
        self._w, self._r = self._open(busy_timeout_s)
        self._room = FullDisk(self.path, self._wal_bytes)  # making room on a full disk

    # --- opening -------------------------------------------------------------------------

    def _open(self, busy_timeout_s: float) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        path = self.path
        try:
            Path(path).resolve().parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(
                f"request store {path!r}: cannot create its directory ({e}); "
                "choose a writable --db path"
            ) from e
        conns: list[sqlite3.Connection] = []
        try:
            w = connect(path, busy_timeout_s)
            conns.append(w)
            self._migrate(w)
            w.execute(f"PRAGMA cache_size = -{_WRITER_CACHE_KIB}")
            # Writes must be possible now (a read-only file, a locked database), rather than
            # failing later in the writer.
            transaction(w, "DELETE FROM records WHERE rid = x''")
            self._apply_size_limit(w)
            self._ids = dict(w.execute("SELECT text, id FROM labels").fetchall())
            r = connect(path, busy_timeout_s)
            conns.append(r)
            r.execute("SELECT COUNT(*) FROM records WHERE 0").fetchone()
        except StoreError:
            for c in conns:
                c.close()
            raise
        except sqlite3.Error as e:
            for c in conns:
                c.close()
            raise StoreError(f"request store {path!r}: {explain(e)}") from e
        return w, r

    def _migrate(self, conn: sqlite3.Connection) -> None:
        path = self.path
        migrated_rows = False
        created = False  # a new file: one line when it is ready, not one per migration
        while True:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Read inside the write transaction: another process may have migrated.
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"request store {path!r} has schema version {version}, newer than "
                        f"this energy-proxy knows ({SCHEMA_VERSION}); upgrade energy-proxy or "
                        "point --db at another file"
                    )
                if version == SCHEMA_VERSION:
                    conn.execute("ROLLBACK")
                    break
                if (
                    version == 0
                    and conn.execute(
                        "SELECT 1 FROM sqlite_master WHERE name NOT LIKE 'sqlite%' LIMIT 1"
                    ).fetchone()
                ):
                    # Someone else's database: do not add our tables to it.
                    raise StoreError(
                        f"request store {path!r} holds tables but no energy-proxy schema "
                        "version; point --db at a new file"
                    )
                if version == 2:
                    n = conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
                    migrated_rows = n > 0
                    if migrated_rows:
                        log.info("request store %s: compacting %d records (schema 3)", path, n)
                created = created or version == 0
                MIGRATIONS[version](conn)
                conn.execute(f"PRAGMA user_version = {version + 1}")
                conn.execute("COMMIT")
                if created:
                    if version + 1 == SCHEMA_VERSION:
                        log.info("request store %s: created (schema %d)", path, SCHEMA_VERSION)
                else:
                    log.info("request store %s: schema migrated to version %d", path, version + 1)
            except BaseException:
                rollback(conn)
                raise
        if migrated_rows and int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]) != 2:
            # Give the old rows' space back, and let later drops give theirs.
            try:
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                conn.execute("VACUUM")
            except sqlite3.Error as e:
                log.warning("request store %s: VACUUM after migrating failed: %s", path, e)

    def _apply_size_limit(self, conn: sqlite3.Connection) -> None:
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        # The limit holds the write-ahead log too: the log is checkpointed once it holds
        # half its share (a batch's transaction goes on past the mark before it can be)
        # and cut back to that after; the file gets the rest.
        wal_bytes = self._wal_bytes
        wal_pages = max(1, wal_bytes // 2 // page_size)
        conn.execute(f"PRAGMA wal_autocheckpoint = {wal_pages}")
        conn.execute(f"PRAGMA journal_size_limit = {wal_bytes // 2}")
        max_pages = (self.max_bytes - wal_bytes) // page_size
        pages, free = self._pages(conn)
        if pages > max_pages:
            dropped = 0
            while pages - free > 0.9 * max_pages:
                n = self._drop_oldest(conn)
                if n == 0:
                    break
                dropped += n
                pages, free = self._pages(conn)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA incremental_vacuum")
            pages, free = self._pages(conn)
            log.warning(
                "request store %s is larger than its limit (%.0f MB): dropped its %d oldest "
                "records; the file is now %.1f MB",
                self.path,
                self.max_bytes / 1e6,
                dropped,
                pages * page_size / 1e6,
            )
        conn.execute(f"PRAGMA max_page_count = {max(max_pages, pages)}")

    @staticmethod
    def _pages(conn: sqlite3.Connection) -> tuple[int, int]:
        pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
        free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        return pages, free

    def _drop_oldest(self, conn: sqlite3.Connection) -> int:
        lo, hi = conn.execute("SELECT MIN(rowid), MAX(rowid) FROM records").fetchone()
        if lo is None:
            return 0
        n = max(MIN_MAKE_ROOM_ROWS, math.ceil((hi - lo + 1) * MAKE_ROOM_FRACTION))
        return transaction(conn, "DELETE FROM records WHERE rowid < ?", (lo + n,))

    # --- the writer side -----------------------------------------------------------------

    def _label_ids(self, conn: sqlite3.Connection, texts: set[str]) -> None:
        """Ids for label texts not seen yet, inserted in the batch's transaction; they join
        the cache when it commits (`_staged`)."""
        new = sorted(texts - self._ids.keys() - self._staged.keys())
        if not new:
            return
        conn.executemany("INSERT OR IGNORE INTO labels (text) VALUES (?)", [(t,) for t in new])
        marks = ", ".join("?" for _ in new)
        self._staged.update(
            conn.execute(f"SELECT text, id FROM labels WHERE text IN ({marks})", new).fetchall()
        )

    def _id(self, text: str) -> int:
        found = self._ids.get(text)
        return self._staged[text] if found is None else found

    def write(self, batch: Sequence[RequestRecord]) -> Written:
        """In chunks of `WRITE_CHUNK_RECORDS`: each chunk's Python work (about a
        millisecond) is followed by its INSERT, during which SQLite releases the GIL, so
        the event loop never waits long for it."""
        out = Written()
        seen: set[bytes] = set()
        inserted: list[RequestRecord] = []
        conn = self._w
        self._staged = {}
        conn.execute("BEGIN IMMEDIATE")
        try:
            for i in range(0, len(batch), WRITE_CHUNK_RECORDS):
                records, texts = screen(batch[i : i + WRITE_CHUNK_RECORDS], seen, out)
                self._label_ids(conn, texts)
                rows, good = encode_all(records, self._id, out)
                ins, bad = self._insert(conn, rows, good)
                inserted += ins
                out.rejected += bad
                out.duplicates += len(good) - len(ins) - len(bad)
            hourly = rollup(inserted)
            self._upsert_rollups(conn, "rollups", "hour", hourly)
            self._upsert_rollups(conn, "rollups_daily", "day", by_day(hourly))
            self._upsert_tenant_usage(conn, tenant_hours(inserted))
        except BaseException:
            rollback(conn)
            self._staged = {}
            raise
        return out

    @staticmethod
    def _insert(
        conn: sqlite3.Connection, rows: list[tuple[object, ...]], records: list[RequestRecord]
    ) -> tuple[list[RequestRecord], list[RequestRecord]]:
        """Insert `rows` in as few multi-row statements as SQLite's variable limit allows;
        the records inserted (not already stored) and those SQLite refused for their data.

        Not `executemany`: it releases and retakes the GIL around every row, and each retake
        stalls the event loop's thread (measured: 13% of streamed throughput at 1.5k
        requests/s, against under 2% with one statement per batch; bench/overhead.py)."""
        per_stmt = max(1, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(COLUMNS))
        keys: set[bytes] = set()
        bad: list[RequestRecord] = []
        for i in range(0, len(rows), per_stmt):
            part = rows[i : i + per_stmt]
            try:
                cur = conn.execute(insert_records_sql(len(part)), [v for row in part for v in row])
                keys.update(k for (k,) in cur.fetchall())
            except _SQL_DATA_ERRORS:
                # A row is bad; SQLite undid only that statement (the transaction goes on):
                # one by one, so that the others still land.
                for row, r in zip(part, records[i : i + per_stmt], strict=True):
                    try:
                        cur = conn.execute(insert_records_sql(1), row)
                        keys.update(k for (k,) in cur.fetchall())
                    except _SQL_DATA_ERRORS:
                        bad.append(r)
        inserted = [r for row, r in zip(rows, records, strict=True) if row[0] in keys]
        return inserted, bad

    def _upsert_tenant_usage(
        self, conn: sqlite3.Connection, usage: dict[tuple[int, str], tuple[float, float]]
    ) -> None:
        if not usage:
            return
        params: list[object] = []
        for (hour, tenant), (joules, co2eq_g) in usage.items():
            params += (hour, self._id(tenant), joules, co2eq_g)
        conn.execute(upsert_tenant_usage_sql(len(usage)), params)

    def _upsert_rollups(
        self, conn: sqlite3.Connection, table: str, period: str, sums: dict[RollupKey, Sums]
    ) -> None:
        if not sums:
            return
        params: list[object] = []
        for k, s in sums.items():
            params += (
                k.period,
                self._id(k.model),
                self._id(k.category),
                self._id(k.backend),
                self._id(k.tenant),
                s.count,
                s.joules,
                s.co2eq_g,
                s.token_joules,
                s.tokens,
            )
        conn.execute(upsert_rollups_sql(table, period, len(sums)), params)

    def commit(self) -> None:
        try:
            self._w.execute("COMMIT")
        except BaseException:
            rollback(self._w)
            self._staged = {}
            raise
        self._ids.update(self._staged)
        self._staged = {}
        self._room.after_commit(self._w)

    def room_wanted(self) -> bool:
        return self._room.wanted()

    def make_room(self) -> int:
        return self._room.make_room(self._w)

    def rollback(self) -> None:
        rollback(self._w)
        self._staged = {}

    def is_full(self, error: BaseException) -> bool:
        return is_full(error)

    def maintain(self) -> int:
        return 0  # SQLite enforces the size limit itself (max_page_count)

    def close_writer(self) -> None:
        self._room.last_checkpoint(self._w)
        self._w.close()

    # --- the read side -------------------------------------------------------------------

    def _text(self, label_id: int) -> str:
        text = self._texts.get(label_id)
        if text is None:
            self._load_labels()
            text = self._texts[label_id]
        return text

    def _label_id(self, text: str) -> int | None:
        found = self._text_ids.get(text)
        if found is None:
            self._load_labels()
            found = self._text_ids.get(text)
        return found

    def _load_labels(self) -> None:
        rows = self._r.execute("SELECT id, text FROM labels").fetchall()
        self._texts = dict(rows)
        self._text_ids = {t: i for i, t in rows}

    def _read(self, fn: Callable[[sqlite3.Connection], object]) -> object:
        with self._rlock:
            try:
                return fn(self._r)
            except sqlite3.Error as e:
                raise StoreError(f"request store {self.path!r}: {explain(e)}") from e

    def get(self, request_id: str, tenant: str | None) -> RequestRecord | None:
        def find(conn: sqlite3.Connection) -> RequestRecord | None:
            tenant_id = None
            if tenant is not None:
                tenant_id = self._label_id(tenant)
                if tenant_id is None:
                    return None  # the tenant has no records at all
            row = conn.execute(f"{SELECT_RECORD} WHERE rid = ?", (id_key(request_id),)).fetchone()
            if row is not None and (tenant_id is None or row[TENANT] == tenant_id):
                return decode(row, self._text)
            scope, params = ("", ()) if tenant_id is None else (" AND tenant = ?", (tenant_id,))
            row = conn.execute(
                f"{SELECT_RECORD} WHERE client_request_id = ?{scope} ORDER BY rowid DESC LIMIT 1",
                (request_id, *params),
            ).fetchone()
            return None if row is None else decode(row, self._text)

        found = self._read(find)
        assert found is None or isinstance(found, RequestRecord)
        return found

    def tenant_usage(self, tenant: str, since_hour: int) -> tuple[float, float]:
        def query(conn: sqlite3.Connection) -> tuple[float, float]:
            tenant_id = self._label_id(tenant)
            if tenant_id is None:
                return 0.0, 0.0
            row = conn.execute(
                "SELECT TOTAL(joules), TOTAL(co2eq_g) FROM tenant_usage "
                "WHERE tenant = ? AND hour >= ?",
                (tenant_id, since_hour),
            ).fetchone()
            return float(row[0]), float(row[1])

        found = self._read(query)
        assert isinstance(found, tuple)
        return found

    def sums(self, since_hour: int | None, tenant: str | None) -> dict[tuple[str, str], Sums]:
        span = Span.of(since_hour)

        def query(conn: sqlite3.Connection) -> dict[tuple[str, str], Sums]:
            scope: tuple[int, ...] = ()
            where = ""
            if tenant is not None:
                tenant_id = self._label_id(tenant)
                if tenant_id is None:
                    return {}
                where, scope = " AND tenant = ?", (tenant_id,)
            parts = [f"SELECT * FROM rollups_daily WHERE day >= ?{where}"]
            params: list[int] = [span.first_day if span.first_day is not None else -(2**62)]
            params += scope
            if span.hours is not None:
                parts.append(f"SELECT * FROM rollups WHERE hour >= ? AND hour < ?{where}")
                params += (*span.hours, *scope)
            rows = conn.execute(
                "SELECT model, category, SUM(count), TOTAL(joules), TOTAL(co2eq_g), "
                f"TOTAL(token_joules), SUM(tokens) FROM ({' UNION ALL '.join(parts)}) "
                "GROUP BY model, category",
                params,
            ).fetchall()
            return {
                (self._text(m), self._text(c)): Sums(int(n), j, g, tj, int(t))
                for m, c, n, j, g, tj, t in rows
            }

        found = self._read(query)
        assert isinstance(found, dict)
        return found

    def count(self) -> int:
        n = self._read(lambda c: c.execute("SELECT COUNT(*) FROM records").fetchone()[0])
        assert isinstance(n, int)
        return n

    def prune(self, cutoff_s: float) -> int:
        cutoff_ms = math.floor(cutoff_s * 1000.0)
        cutoff_hour = math.floor(cutoff_s / SECONDS_PER_HOUR)

        def delete(conn: sqlite3.Connection) -> int:
            deleted = 0
            while True:
                # Oldest first, in the order they were written: a chunk with a record newer
                # than the cutoff ends the pass.
                n = transaction(
                    conn,
                    "DELETE FROM records WHERE rowid IN (SELECT rowid FROM records "
                    "ORDER BY rowid LIMIT ?) AND finished_ms < ?",
                    (_PRUNE_CHUNK_ROWS, cutoff_ms),
                )
                deleted += n
                if n < _PRUNE_CHUNK_ROWS:
                    break
            transaction(conn, "DELETE FROM rollups WHERE hour < ?", (cutoff_hour,))
            transaction(
                conn, "DELETE FROM rollups_daily WHERE day < ?", (cutoff_hour // HOURS_PER_DAY,)
            )
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA incremental_vacuum")
            return deleted

        n = self._read(delete)
        assert isinstance(n, int)
        return n

    def close_reader(self) -> None:
        with self._rlock:
            self._r.close()
