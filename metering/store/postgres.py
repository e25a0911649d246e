"""The request store in PostgreSQL: one store for a fleet of proxies (`--db postgresql://`).

The same schema ideas as SQLite's (`sqlite.py`), in a schema (namespace) of its own,
`energy_proxy`: `labels`, compact `records` keyed by the proxy's 12-byte id, and hourly
`rollups`. A batch is one statement: its records are inserted (`unnest` over one array per
column; an id already stored keeps its first record) and the rows actually inserted are
added to the rollups in the same statement, so a batch written twice (a commit whose
answer was lost with the connection) is counted once. Several proxies write side by side;
migrations take an advisory lock.

The size limit (`--db-max-mb`) is kept as a number of records, the limit divided by the
bytes a record takes here (`BYTES_PER_RECORD`, measured by bench/store.py, indexes
included): PostgreSQL does not give a table's freed space back to the filesystem, so its
size cannot be read off the files the way SQLite's can.

A connection that breaks (PostgreSQL restarting, the network) is dropped and made again at
the next write or read; the writer keeps its batch and retries, so nothing answered is lost
while PostgreSQL is away, up to the store's queue.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import orjson
import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from metering.store.columns import TENANT, decode
from metering.store.database import (
    DATA_ERRORS,
    WRITE_CHUNK_RECORDS,
    Written,
    encode_all,
    screen,
)
from metering.store.postgres_schema import (
    MIGRATIONS,
    SCHEMA,
    SCHEMA_VERSION,
    SELECT_RECORD,
    WRITE_SQL,
)
from metering.store.records import RequestRecord, StoreError, id_key
from metering.store.rollup import HOURS_PER_DAY, SECONDS_PER_HOUR, Span, Sums

log = logging.getLogger("energy_proxy.store")

T = TypeVar("T")

BYTES_PER_RECORD = 330  # measured by bench/store.py at 1 M records: table, indexes, rollups
_MIGRATION_LOCK = 0x656E_6572_6779_0001  # pg_advisory_xact_lock key: "energy" + 1
_UPKEEP_LOCK = 0x656E_6572_6779_0002
_PRUNE_CHUNK_ROWS = 10_000
_MIN_MAKE_ROOM_ROWS = 1_000
_MAKE_ROOM_FRACTION = 0.05
_CONNECT_DEFAULTS = {
    "connect_timeout": "5",
    "application_name": "energy-proxy",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "3",
    "keepalives_count": "3",
}
_PG_DATA_ERRORS: tuple[type[Exception], ...] = (
    *DATA_ERRORS,
    psycopg.DataError,
    psycopg.IntegrityError,
)


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unreadable URL)"
    host = params.get("host", "")
    port = params.get("port")
    user = params.get("user")
    db = params.get("dbname", "")
    return f"postgresql://{f'{user}@' if user else ''}{host}{f':{port}' if port else ''}/{db}"


def explain(e: BaseException) -> str:
    msg = (str(e) or type(e).__name__).strip().replace("\n", " ")
    if isinstance(e, psycopg.OperationalError):
        return f"{msg} (is PostgreSQL running and reachable? check the --db URL)"
    if isinstance(e, pg_errors.InsufficientPrivilege):
        return f"{msg} (the --db user needs CREATE on the database, or a schema {SCHEMA})"
    return msg


class PostgresDatabase:
    """Records and rollups in PostgreSQL: a writer connection (the store's writer thread)
    and a reader connection behind a lock (any thread), each made again when it breaks."""

    kind = "postgresql"

    def __init__(self, url: str, *, max_bytes: int, timeout_s: float = 5.0) -> None:
        """Connect, migrate and check that writes work. Raises `StoreError` when PostgreSQL
        cannot be reached or used, or its schema is newer than this code."""
        self.where = redact(url)
        try:
            given = conninfo_to_dict(url)
        except psycopg.ProgrammingError as e:
            raise StoreError(f"request store: --db is not a PostgreSQL URL: {e}") from None
        extra = {k: v for k, v in _CONNECT_DEFAULTS.items() if k not in given}
        self._conninfo = make_conninfo(url, **extra)
        self.max_records = max(1, max_bytes // BYTES_PER_RECORD)
        self._timeout_ms = round(timeout_s * 1000)
        self._rlock = threading.Lock()
        self._w: psycopg.Connection[Any] | None = None
        self._r: psycopg.Connection[Any] | None = None
        self._ids: dict[str, int] = {}  # label text -> id (the writer's, committed)
        self._staged: dict[str, int] = {}  # label ids of the open transaction
        self._texts: dict[int, str] = {}
        self._text_ids: dict[str, int] = {}
        try:
            w = self._writer()
            self._migrate(w)
            with w.cursor() as cur:
                cur.execute(f"DELETE FROM {SCHEMA}.records WHERE rid = ''::bytea")
            w.rollback()
            self._ids = dict(w.execute(f"SELECT text, id FROM {SCHEMA}.labels").fetchall())
            w.rollback()
            self._reader()
        except StoreError:
            self._close_all()
            raise
        except psycopg.Error as e:
            self._close_all()
            raise StoreError(f"request store {self.where}: {explain(e)}") from e

    # --- connections ---------------------------------------------------------------------

    def _connect(self, *, autocommit: bool, statement_timeout_ms: int) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self._conninfo, autocommit=autocommit)
        try:
            conn.execute(f"SET statement_timeout = {int(statement_timeout_ms)}")
            conn.execute("SET lock_timeout = 10000")
            if not autocommit:
                conn.commit()
        except BaseException:
            conn.close()
            raise
        return conn

    def _writer(self) -> psycopg.Connection[Any]:
        if self._w is None or self._w.closed:
            self._w = self._connect(autocommit=False, statement_timeout_ms=60_000)
        return self._w

    def _reader(self) -> psycopg.Connection[Any]:
        if self._r is None or self._r.closed:
            self._r = self._connect(
                autocommit=True, statement_timeout_ms=max(1000, 2 * self._timeout_ms)
            )
        return self._r

    def _drop_writer(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None

    def _close_all(self) -> None:
        self._drop_writer()
        if self._r is not None:
            self._r.close()
            self._r = None

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            cur.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_version (version integer NOT NULL)"
            )
            row = cur.execute(f"SELECT max(version) FROM {SCHEMA}.schema_version").fetchone()
            version = int(row[0]) if row and row[0] is not None else 0
            if version > SCHEMA_VERSION:
                conn.rollback()
                raise StoreError(
                    f"request store {self.where} has schema version {version}, newer than this "
                    f"energy-proxy knows ({SCHEMA_VERSION}); upgrade energy-proxy"
                )
            for v in range(version, SCHEMA_VERSION):
                MIGRATIONS[v](cur)
                cur.execute(f"DELETE FROM {SCHEMA}.schema_version")
                cur.execute(f"INSERT INTO {SCHEMA}.schema_version VALUES (%s)", (v + 1,))
                if version > 0:  # a new store says so once, below
                    log.info("request store %s: schema migrated to version %d", self.where, v + 1)
            if version == 0:
                log.info("request store %s: created (schema %d)", self.where, SCHEMA_VERSION)
        conn.commit()

    # --- the writer side -----------------------------------------------------------------

    def _label_ids(self, conn: psycopg.Connection[Any], texts: set[str]) -> None:
        """Ids for label texts not seen yet, inserted in the batch's transaction (sorted:
        two proxies adding the same new labels never wait on each other in a cycle); they
        join the cache when it commits (`_staged`)."""
        new = sorted(texts - self._ids.keys() - self._staged.keys())
        if not new:
            return
        conn.execute(
            f"INSERT INTO {SCHEMA}.labels (text) SELECT unnest(%s::text[]) "
            "ON CONFLICT (text) DO NOTHING",
            (new,),
        )
        self._staged.update(
            conn.execute(
                f"SELECT text, id FROM {SCHEMA}.labels WHERE text = ANY(%s)", (new,)
            ).fetchall()
        )

    def _id(self, text: str) -> int:
        found = self._ids.get(text)
        return self._staged[text] if found is None else found

    def write(self, batch: Sequence[RequestRecord]) -> Written:
        """One statement per chunk of `WRITE_CHUNK_RECORDS` (the GIL is free while it runs).
        A record PostgreSQL refuses fails its statement and so the transaction: the batch
        is then written again one record at a time, each in a savepoint, without it."""
        try:
            conn = self._writer()
            try:
                return self._write(conn, batch, one_by_one=False)
            except _PG_DATA_ERRORS:
                self._rollback_writer()
                return self._write(conn, batch, one_by_one=True)
        except psycopg.Error:
            self._after_error()
            raise

    def _write(
        self, conn: psycopg.Connection[Any], batch: Sequence[RequestRecord], *, one_by_one: bool
    ) -> Written:
        out = Written()
        seen: set[bytes] = set()
        self._staged = {}
        step = 1 if one_by_one else WRITE_CHUNK_RECORDS
        for i in range(0, len(batch), step):
            records, texts = screen(batch[i : i + step], seen, out, nul_ok=False)
            self._label_ids(conn, texts)
            rows, good = encode_all(records, self._id, out)
            if not rows:
                continue
            if not one_by_one:
                out.duplicates += len(rows) - self._insert(conn, rows)
                continue
            conn.execute("SAVEPOINT one_record")
            try:
                out.duplicates += 1 - self._insert(conn, rows)
            except _PG_DATA_ERRORS:
                conn.execute("ROLLBACK TO SAVEPOINT one_record")
                out.rejected += good
            else:
                conn.execute("RELEASE SAVEPOINT one_record")
        return out

    @staticmethod
    def _insert(conn: psycopg.Connection[Any], rows: list[tuple[object, ...]]) -> int:
        """Insert a chunk of rows; how many were new. The rows go as one JSON document
        (orjson: C, microseconds), not as arrays psycopg would adapt value by value in
        Python (milliseconds a chunk, with the GIL held: stalls of the event loop). JSON
        has no NaN: a NaN figure is stored as NULL, and read back as NaN, as in SQLite."""
        payload = orjson.dumps([(row[0].hex(), *row[1:]) for row in rows])  # type: ignore[attr-defined]
        row = conn.execute(WRITE_SQL, (payload.decode(),)).fetchone()
        return int(row[0]) if row else 0

    def _rollback_writer(self) -> None:
        if self._w is None:
            return
        try:
            self._w.rollback()
        except psycopg.Error:
            self._drop_writer()

    def _after_error(self) -> None:
        # A broken connection is made again at the next attempt; a live one rolls back.
        self._staged = {}
        if self._w is not None and (self._w.closed or self._w.broken):
            self._drop_writer()
        else:
            self._rollback_writer()

    def commit(self) -> None:
        if self._w is None:
            raise StoreError(f"request store {self.where}: no transaction to commit")
        try:
            self._w.commit()
        except psycopg.Error:
            self._after_error()
            raise
        self._ids.update(self._staged)
        self._staged = {}

    def rollback(self) -> None:
        self._after_error()

    def is_full(self, error: BaseException) -> bool:
        return isinstance(error, pg_errors.DiskFull)

    def _drop_oldest(self, keep: int | None) -> int:
        """Delete the oldest records: all but the newest `keep` (None: a twentieth, at
        least a thousand), in chunks, one transaction each; how many."""
        conn = self._writer()
        row = conn.execute(f"SELECT min(id), max(id) FROM {SCHEMA}.records").fetchone()
        conn.commit()
        if row is None or row[0] is None:
            return 0
        lo, hi = int(row[0]), int(row[1])
        if keep is None:
            bound = lo + max(_MIN_MAKE_ROOM_ROWS, math.ceil((hi - lo + 1) * _MAKE_ROOM_FRACTION))
        else:
            bound = hi - keep + 1
        deleted = 0
        for start in range(lo, bound, _PRUNE_CHUNK_ROWS):
            cur = conn.execute(
                f"DELETE FROM {SCHEMA}.records WHERE id >= %s AND id < %s",
                (start, min(bound, start + _PRUNE_CHUNK_ROWS)),
            )
            deleted += max(0, cur.rowcount)
            conn.commit()
        return deleted

    def make_room(self) -> int:
        try:
            self._after_error()
            return self._drop_oldest(None)
        except psycopg.Error:
            self._after_error()
            raise

    def room_wanted(self) -> bool:
        return False  # the server has its own disk: `maintain` keeps the size limit

    def maintain(self) -> int:
        """The size limit: keep the newest `max_records` records (ids are handed out in
        order, so max(id) - min(id) + 1 is at least the number stored). One proxy of a
        fleet at a time (an advisory lock); the others skip their turn."""
        try:
            conn = self._writer()
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_UPKEEP_LOCK,)).fetchone()
            conn.commit()
            if not row or not row[0]:
                return 0
            try:
                span = conn.execute(
                    f"SELECT max(id) - min(id) + 1 FROM {SCHEMA}.records"
                ).fetchone()
                conn.commit()
                if not span or span[0] is None or span[0] <= self.max_records:
                    return 0
                return self._drop_oldest(self.max_records)
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (_UPKEEP_LOCK,))
                conn.commit()
        except psycopg.Error:
            self._after_error()
            raise

    def close_writer(self) -> None:
        self._drop_writer()

    # --- the read side -------------------------------------------------------------------

    def _read(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        with self._rlock:
            for attempt in (1, 2):
                try:
                    return fn(self._reader())
                except psycopg.OperationalError as e:
                    # A connection from before a restart fails once: try a new one.
                    if self._r is not None:
                        self._r.close()
                        self._r = None
                    if attempt == 2:
                        raise StoreError(f"request store {self.where}: {explain(e)}") from e
                except psycopg.Error as e:
                    raise StoreError(f"request store {self.where}: {explain(e)}") from e
        raise AssertionError("unreachable")

    def _load_labels(self, conn: psycopg.Connection[Any]) -> None:
        rows = conn.execute(f"SELECT id, text FROM {SCHEMA}.labels").fetchall()
        self._texts = dict(rows)
        self._text_ids = {t: i for i, t in rows}

    def _text_of(self, conn: psycopg.Connection[Any]) -> Callable[[int], str]:
        def text(label_id: int) -> str:
            found = self._texts.get(label_id)
            if found is None:
                self._load_labels(conn)
                found = self._texts[label_id]
            return found

        return text

    def _label_id(self, conn: psycopg.Connection[Any], text: str) -> int | None:
        found = self._text_ids.get(text)
        if found is None:
            self._load_labels(conn)
            found = self._text_ids.get(text)
        return found

    def get(self, request_id: str, tenant: str | None) -> RequestRecord | None:
        def find(conn: psycopg.Connection[Any]) -> RequestRecord | None:
            tenant_id = None
            if tenant is not None:
                tenant_id = self._label_id(conn, tenant)
                if tenant_id is None:
                    return None
            text = self._text_of(conn)
            row = conn.execute(f"{SELECT_RECORD} WHERE rid = %s", (id_key(request_id),)).fetchone()
            if row is not None and (tenant_id is None or row[TENANT] == tenant_id):
                return decode(row, text)
            scope, params = ("", ()) if tenant_id is None else (" AND tenant = %s", (tenant_id,))
            row = conn.execute(
                f"{SELECT_RECORD} WHERE client_request_id = %s{scope} ORDER BY id DESC LIMIT 1",
                (request_id, *params),
            ).fetchone()
            return None if row is None else decode(row, text)

        return self._read(find)

    def tenant_usage(self, tenant: str, since_hour: int) -> tuple[float, float]:
        def query(conn: psycopg.Connection[Any]) -> tuple[float, float]:
            tenant_id = self._label_id(conn, tenant)
            if tenant_id is None:
                return 0.0, 0.0
            row = conn.execute(
                f"SELECT COALESCE(sum(joules), 0), COALESCE(sum(co2eq_g), 0) "
                f"FROM {SCHEMA}.tenant_usage WHERE tenant = %s AND hour >= %s",
                (tenant_id, since_hour),
            ).fetchone()
            return (float(row[0]), float(row[1])) if row else (0.0, 0.0)

        return self._read(query)

    def sums(self, since_hour: int | None, tenant: str | None) -> dict[tuple[str, str], Sums]:
        span = Span.of(since_hour)

        def query(conn: psycopg.Connection[Any]) -> dict[tuple[str, str], Sums]:
            where, scope = "", []
            if tenant is not None:
                tenant_id = self._label_id(conn, tenant)
                if tenant_id is None:
                    return {}
                where, scope = " AND tenant = %s", [tenant_id]
            parts = [f"SELECT * FROM {SCHEMA}.rollups_daily WHERE day >= %s{where}"]
            params: list[int] = [span.first_day if span.first_day is not None else -(2**31)]
            params += scope
            if span.hours is not None:
                parts.append(
                    f"SELECT * FROM {SCHEMA}.rollups WHERE hour >= %s AND hour < %s{where}"
                )
                params += [*span.hours, *scope]
            rows = conn.execute(
                "SELECT model, category, sum(count), sum(joules), sum(co2eq_g), "
                f"sum(token_joules), sum(tokens) FROM ({' UNION ALL '.join(parts)}) r "
                "GROUP BY model, category",
                params,
            ).fetchall()
            text = self._text_of(conn)
            return {
                (text(m), text(c)): Sums(int(n), float(j), float(g), float(tj), int(t))
                for m, c, n, j, g, tj, t in rows
            }

        return self._read(query)

    def count(self) -> int:
        def query(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute(f"SELECT count(*) FROM {SCHEMA}.records").fetchone()
            return int(row[0]) if row else 0

        return self._read(query)

    def prune(self, cutoff_s: float) -> int:
        cutoff_ms = math.floor(cutoff_s * 1000.0)
        cutoff_hour = math.floor(cutoff_s / SECONDS_PER_HOUR)

        def delete(conn: psycopg.Connection[Any]) -> int:
            deleted = 0
            while True:
                cur = conn.execute(
                    f"DELETE FROM {SCHEMA}.records WHERE id IN (SELECT id FROM {SCHEMA}.records "
                    "ORDER BY id LIMIT %s) AND finished_ms < %s",
                    (_PRUNE_CHUNK_ROWS, cutoff_ms),
                )
                n = max(0, cur.rowcount)
                deleted += n
                if n < _PRUNE_CHUNK_ROWS:
                    break
            conn.execute(f"DELETE FROM {SCHEMA}.rollups WHERE hour < %s", (cutoff_hour,))
            conn.execute(
                f"DELETE FROM {SCHEMA}.rollups_daily WHERE day < %s",
                (cutoff_hour // HOURS_PER_DAY,),
            )
            return deleted

        return self._read(delete)

    def close_reader(self) -> None:
        with self._rlock:
            if self._r is not None:
                self._r.close()
                self._r = None
