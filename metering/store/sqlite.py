"""The request store's embedded database: one SQLite file, WAL, bounded in size.

Schema (version 3): `labels` (id, text) holds each label value once; `records` holds one
compact row per request (`columns.py`): about 190 bytes with its index, measured by
bench/store.py; `rollups` (WITHOUT ROWID, keyed by hour x model group x category x
backend x tenant) holds what summaries read.

The size limit is SQLite's own: `PRAGMA max_page_count` on the writer's connection makes
the file refuse to grow past `--db-max-mb` with SQLITE_FULL, as a full disk does; the store
then drops the oldest records (`make_room`) and writes again into the pages they freed. So
the file never grows past the limit, a full disk is handled the same way, and the rollups
keep counting what was dropped.
"""

from __future__ import annotations

import contextlib
import functools
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
from metering.store.records import RequestRecord, StoreError, id_key
from metering.store.rollup import (
    HOURS_PER_DAY,
    SECONDS_PER_HOUR,
    RollupKey,
    Span,
    Sums,
    by_day,
    rollup,
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
_MIN_MAKE_ROOM_ROWS = 1_000
_MAKE_ROOM_FRACTION = 0.05  # of the records, dropped when the file is full
_JOURNAL_SIZE_LIMIT_BYTES = 16 * 1024 * 1024  # the WAL is truncated to this after a checkpoint
_WRITER_CACHE_KIB = 64 * 1024  # the id index's pages stay in memory up to ~2.5 M records
MIN_MAX_BYTES = 1_000_000  # --db-max-mb 1
_ROLLUP_SUMS = ("count", "joules", "co2eq_g", "token_joules", "tokens")


# --- schema ------------------------------------------------------------------------------


def _migrate_v1(conn: sqlite3.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE requests (
            request_id TEXT PRIMARY KEY NOT NULL,
            finished_at REAL NOT NULL,
            model TEXT NOT NULL,
            backend TEXT NOT NULL,
            category TEXT NOT NULL,
            status INTEGER NOT NULL,
            duration_s REAL,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            tokens_source TEXT NOT NULL,
            joules REAL,
            gpu_joules REAL,
            cpu_joules REAL,
            dynamic_joules REAL,
            joules_by_source TEXT NOT NULL,
            method TEXT NOT NULL,
            carbon_intensity_g_per_kwh REAL,
            carbon_intensity_source TEXT NOT NULL,
            co2eq_g REAL,
            embodied_g REAL,
            sci_g REAL,
            energy TEXT NOT NULL
        )
        """
    )
    conn.execute("CREATE INDEX requests_finished_at ON requests (finished_at)")
    conn.execute("CREATE INDEX requests_model_category ON requests (model, category)")


def _migrate_v2(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE requests ADD COLUMN tenant TEXT NOT NULL DEFAULT ''")
    conn.execute("ALTER TABLE requests ADD COLUMN client_request_id TEXT")
    conn.execute("CREATE INDEX requests_client_request_id ON requests (client_request_id)")


def _migrate_v3(conn: sqlite3.Connection) -> None:
    # Compact records (no figure twice, labels by id, the id as bytes) and hourly rollups;
    # the v2 rows are carried over and rolled up.
    conn.execute("CREATE TABLE labels (id INTEGER PRIMARY KEY, text TEXT NOT NULL UNIQUE)")
    conn.execute(
        """
        CREATE TABLE records (
            rid BLOB NOT NULL,
            finished_ms INTEGER NOT NULL,
            model INTEGER NOT NULL,
            model_group INTEGER NOT NULL,
            backend INTEGER NOT NULL,
            category INTEGER NOT NULL,
            tenant INTEGER NOT NULL,
            status INTEGER NOT NULL,
            duration_s REAL,
            prompt_tokens INTEGER,
            completion_tokens INTEGER NOT NULL,
            tokens_source INTEGER NOT NULL,
            joules REAL,
            gpu_joules REAL,
            cpu_joules REAL,
            dynamic_joules REAL,
            method INTEGER NOT NULL,
            attribution INTEGER NOT NULL,
            intensity_g_per_kwh REAL,
            intensity_source INTEGER NOT NULL,
            intensity_zone INTEGER NOT NULL,
            intensity_age_s REAL,
            co2eq_g REAL,
            embodied_g REAL,
            client_request_id TEXT
        )
        """
    )
    conn.execute("CREATE UNIQUE INDEX records_rid ON records (rid)")
    conn.execute(
        "CREATE INDEX records_client_request_id ON records (client_request_id) "
        "WHERE client_request_id IS NOT NULL"
    )
    for table, period in (("rollups", "hour"), ("rollups_daily", "day")):
        conn.execute(
            f"""
            CREATE TABLE {table} (
                {period} INTEGER NOT NULL,
                model INTEGER NOT NULL,
                category INTEGER NOT NULL,
                backend INTEGER NOT NULL,
                tenant INTEGER NOT NULL,
                count INTEGER NOT NULL,
                joules REAL NOT NULL,
                co2eq_g REAL NOT NULL,
                token_joules REAL NOT NULL,
                tokens INTEGER NOT NULL,
                PRIMARY KEY ({period}, model, category, backend, tenant)
            ) WITHOUT ROWID
            """
        )
    conn.create_function("energy_proxy_id_key", 1, id_key, deterministic=True)
    zone = "COALESCE(json_extract(q.energy, '$.carbon_intensity_zone'), '')"
    attribution = "COALESCE(json_extract(q.energy, '$.attribution'), '')"
    conn.execute(
        f"""
        INSERT OR IGNORE INTO labels (text)
        SELECT model FROM requests q UNION SELECT backend FROM requests q
        UNION SELECT category FROM requests q UNION SELECT tenant FROM requests q
        UNION SELECT tokens_source FROM requests q UNION SELECT method FROM requests q
        UNION SELECT carbon_intensity_source FROM requests q
        UNION SELECT {zone} FROM requests q UNION SELECT {attribution} FROM requests q
        """
    )
    conn.execute(
        f"""
        INSERT OR IGNORE INTO records ({", ".join(COLUMNS)})
        SELECT energy_proxy_id_key(q.request_id), CAST(round(q.finished_at * 1000) AS INTEGER),
               m.id, m.id, b.id, c.id, t.id, q.status, q.duration_s, q.prompt_tokens,
               COALESCE(q.completion_tokens, 0), ts.id, q.joules, q.gpu_joules, q.cpu_joules,
               q.dynamic_joules, me.id, a.id, q.carbon_intensity_g_per_kwh, cs.id, z.id,
               json_extract(q.energy, '$.carbon_intensity_age_s'), q.co2eq_g,
               COALESCE(q.embodied_g, 0.0), q.client_request_id
        FROM requests q
        JOIN labels m ON m.text = q.model
        JOIN labels b ON b.text = q.backend
        JOIN labels c ON c.text = q.category
        JOIN labels t ON t.text = q.tenant
        JOIN labels ts ON ts.text = q.tokens_source
        JOIN labels me ON me.text = q.method
        JOIN labels a ON a.text = {attribution}
        JOIN labels cs ON cs.text = q.carbon_intensity_source
        JOIN labels z ON z.text = {zone}
        ORDER BY q.finished_at
        """
    )
    rebuild_rollups(conn)
    conn.execute("DROP TABLE requests")


def rebuild_rollups(conn: sqlite3.Connection) -> None:
    """Both rollup tables computed anew from the records (schema 3): what the writer adds
    batch by batch (metering/store/rollup.py), in one pass. For the v3 migration, and for
    bench/store.py after it generates records in SQL."""
    conn.execute("DELETE FROM rollups")
    conn.execute("DELETE FROM rollups_daily")
    conn.execute(
        """
        INSERT INTO rollups (hour, model, category, backend, tenant, count, joules, co2eq_g,
                             token_joules, tokens)
        SELECT finished_ms / 3600000, model_group, category, backend, tenant, COUNT(*),
               TOTAL(joules), TOTAL(co2eq_g), TOTAL(CASE WHEN n > 0 THEN joules END), SUM(n)
        FROM (SELECT *, CASE WHEN completion_tokens > 0 THEN completion_tokens
                             ELSE COALESCE(prompt_tokens, 0) END AS n
              FROM records WHERE status = 200)
        GROUP BY 1, 2, 3, 4, 5
        """
    )
    conn.execute(
        """
        INSERT INTO rollups_daily
        SELECT hour / 24, model, category, backend, tenant, SUM(count), TOTAL(joules),
               TOTAL(co2eq_g), TOTAL(token_joules), SUM(tokens)
        FROM rollups GROUP BY 1, 2, 3, 4, 5
        """
    )


# Applied in order: migration i takes the schema from version i to version i + 1
# (`PRAGMA user_version`). Append only; never edit one that has shipped.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _migrate_v1,
    _migrate_v2,
    _migrate_v3,
)
SCHEMA_VERSION = len(MIGRATIONS)


@functools.lru_cache(maxsize=16)
def _insert_records_sql(n: int) -> str:
    one = f"({', '.join('?' for _ in COLUMNS)})"
    return (
        f"INSERT INTO records ({', '.join(COLUMNS)}) VALUES {', '.join([one] * n)} "
        "ON CONFLICT (rid) DO NOTHING RETURNING rid"
    )


@functools.lru_cache(maxsize=64)
def _upsert_rollups_sql(table: str, period: str, n: int) -> str:
    one = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    sums = ", ".join(f"{c} = {c} + excluded.{c}" for c in _ROLLUP_SUMS)
    return (
        f"INSERT INTO {table} ({period}, model, category, backend, tenant, "
        f"{', '.join(_ROLLUP_SUMS)}) VALUES {', '.join([one] * n)} "
        f"ON CONFLICT ({period}, model, category, backend, tenant) DO UPDATE SET {sums}"
    )


_SELECT_RECORD = f"SELECT {', '.join(COLUMNS)} FROM records"


# --- connections -------------------------------------------------------------------------


def _connect(path: str, busy_timeout_s: float) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; every write says BEGIN IMMEDIATE itself,
    # which takes the write lock up front so busy_timeout applies (no lock-upgrade deadlock).
    conn = sqlite3.connect(
        path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
    )
    try:
        if not conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone():
            # A new file: free pages can be given back to the filesystem (only settable
            # before the first table).
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(
                f"request store {path!r}: SQLite refused WAL mode (got {mode!r}); "
                "use a file on a local filesystem for --db"
            )
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT_BYTES}")
    except BaseException:
        conn.close()
        raise
    return conn


def _rollback(conn: sqlite3.Connection) -> None:
    # Never let a failed ROLLBACK hide the error that caused it.
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _transaction(conn: sqlite3.Connection, sql: str, params: Sequence[object] = ()) -> int:
    """Run one statement in its own write transaction; rows changed."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        cur = conn.execute(sql, params)
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return cur.rowcount


def explain(e: BaseException) -> str:
    msg = str(e) or type(e).__name__
    low = msg.lower()
    if "not a database" in low or "malformed" in low:
        return f"{msg} (the file is not an energy-proxy database or is damaged)"
    if "locked" in low or "busy" in low:
        return f"{msg} (another process holds a lock on it)"
    if "unable to open" in low or "readonly" in low or "read-only" in low:
        return f"{msg} (check that the path and its directory are writable)"
    if "full" in low:
        return f"{msg} (no space left: the size limit, --db-max-mb, or the disk)"
    if "disk i/o" in low:
        return f"{msg} (the filesystem refused a write: a full disk or a file size limit)"
    return msg


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
        self.path = self.where = str(Path(path).expanduser())
        self.max_bytes = max_bytes
        self._rlock = threading.Lock()
        self._ids: dict[str, int] = {}  # label text -> id (the writer's, committed)
        self._staged: dict[str, int] = {}  # label ids of the open transaction
        self._texts: dict[int, str] = {}  # label id -> text (the reader's)
        self._text_ids: dict[str, int] = {}  # label text -> id (the reader's)
        self._w, self._r = self._open(busy_timeout_s)

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
            w = _connect(path, busy_timeout_s)
            conns.append(w)
            self._migrate(w)
            w.execute(f"PRAGMA cache_size = -{_WRITER_CACHE_KIB}")
            # Writes must be possible now (a read-only file, a locked database), rather than
            # failing later in the writer.
            _transaction(w, "DELETE FROM records WHERE rid = x''")
            self._apply_size_limit(w)
            self._ids = dict(w.execute("SELECT text, id FROM labels").fetchall())
            r = _connect(path, busy_timeout_s)
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
                MIGRATIONS[version](conn)
                conn.execute(f"PRAGMA user_version = {version + 1}")
                conn.execute("COMMIT")
                log.info("request store %s: schema migrated to version %d", path, version + 1)
            except BaseException:
                _rollback(conn)
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
        max_pages = self.max_bytes // page_size
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
        n = max(_MIN_MAKE_ROOM_ROWS, math.ceil((hi - lo + 1) * _MAKE_ROOM_FRACTION))
        return _transaction(conn, "DELETE FROM records WHERE rowid < ?", (lo + n,))

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
        except BaseException:
            _rollback(conn)
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
                cur = conn.execute(_insert_records_sql(len(part)), [v for row in part for v in row])
                keys.update(k for (k,) in cur.fetchall())
            except _SQL_DATA_ERRORS:
                # A row is bad; SQLite undid only that statement (the transaction goes on):
                # one by one, so that the others still land.
                for row, r in zip(part, records[i : i + per_stmt], strict=True):
                    try:
                        cur = conn.execute(_insert_records_sql(1), row)
                        keys.update(k for (k,) in cur.fetchall())
                    except _SQL_DATA_ERRORS:
                        bad.append(r)
        inserted = [r for row, r in zip(rows, records, strict=True) if row[0] in keys]
        return inserted, bad

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
        conn.execute(_upsert_rollups_sql(table, period, len(sums)), params)

    def commit(self) -> None:
        try:
            self._w.execute("COMMIT")
        except BaseException:
            _rollback(self._w)
            self._staged = {}
            raise
        self._ids.update(self._staged)
        self._staged = {}

    def rollback(self) -> None:
        _rollback(self._w)
        self._staged = {}

    def is_full(self, error: BaseException) -> bool:
        return (
            isinstance(error, sqlite3.OperationalError)
            and getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        )

    def make_room(self) -> int:
        _rollback(self._w)
        return self._drop_oldest(self._w)

    def maintain(self) -> int:
        return 0  # SQLite enforces the size limit itself (max_page_count)

    def close_writer(self) -> None:
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
            row = conn.execute(f"{_SELECT_RECORD} WHERE rid = ?", (id_key(request_id),)).fetchone()
            if row is not None and (tenant_id is None or row[TENANT] == tenant_id):
                return decode(row, self._text)
            scope, params = ("", ()) if tenant_id is None else (" AND tenant = ?", (tenant_id,))
            row = conn.execute(
                f"{_SELECT_RECORD} WHERE client_request_id = ?{scope} ORDER BY rowid DESC LIMIT 1",
                (request_id, *params),
            ).fetchone()
            return None if row is None else decode(row, self._text)

        found = self._read(find)
        assert found is None or isinstance(found, RequestRecord)
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
                n = _transaction(
                    conn,
                    "DELETE FROM records WHERE rowid IN (SELECT rowid FROM records "
                    "ORDER BY rowid LIMIT ?) AND finished_ms < ?",
                    (_PRUNE_CHUNK_ROWS, cutoff_ms),
                )
                deleted += n
                if n < _PRUNE_CHUNK_ROWS:
                    break
            _transaction(conn, "DELETE FROM rollups WHERE hour < ?", (cutoff_hour,))
            _transaction(
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
