"""The request store: every finished request's record in SQLite, durable, off the request path.

`RequestStore.add()` only appends to an in-memory queue (O(1), never touches the disk and
never raises); a dedicated writer thread with its own connection drains the queue in small
batches, one transaction each (`INSERT OR REPLACE` by request id). A failing write (disk
full, database locked) is logged and retried with backoff, the records kept; nothing is lost
silently. Everything already queued is written by `flush()` and by `close()`, which the app
calls on shutdown, so nothing a client was told is lost on a clean shutdown.

Reads (`get`, `summary`, `count`, `prune`) share one second connection guarded by a lock;
WAL lets it read beside the writer. They may block briefly: call them from a thread
(`asyncio.to_thread`), never on the event loop.

Records hold ids, labels and numbers only, never prompt or completion text.

Errors, all raised as `StoreError`: at `open` (a corrupt file, an unwritable path, a locked
database, a schema newer than this code) so start-up fails clearly; from reads when SQLite
fails; never from `add`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from metering.report import EnergyReport

log = logging.getLogger("energy_proxy.store")


class StoreError(Exception):
    """The request store cannot be opened or read; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One finished request. Units are in the names; `finished_at` is unix seconds.

    `energy` is the exact energy object the client was told (`EnergyReport.to_dict()`),
    stored as JSON and returned verbatim by `RequestStore.get`. Do not mutate it (or
    `joules_by_source`) after `add`: the writer serialises it later, off the request path.
    `status` is the HTTP status the client got; 499 means the client hung up.
    """

    request_id: str
    finished_at: float
    model: str
    backend: str
    category: str
    status: int
    duration_s: float
    prompt_tokens: int | None
    completion_tokens: int
    tokens_source: str
    joules: float
    gpu_joules: float | None
    cpu_joules: float | None
    dynamic_joules: float
    joules_by_source: dict[str, float]
    method: str
    carbon_intensity_g_per_kwh: float
    carbon_intensity_source: str
    co2eq_g: float
    embodied_g: float | None
    sci_g: float | None
    energy: dict[str, Any]
    # Who asked (the API key's name; "" when the proxy has no keys) and the client's own
    # x-request-id, if it sent a usable one. `request_id` is always the proxy's.
    tenant: str = ""
    client_request_id: str | None = None

    @classmethod
    def from_report(
        cls,
        report: EnergyReport,
        *,
        backend: str,
        status: int,
        finished_at: float,
        joules_by_source: dict[str, float] | None = None,
        energy: dict[str, Any] | None = None,
        tenant: str = "",
        client_request_id: str | None = None,
    ) -> RequestRecord:
        """The record of `report`. Pass `energy` when the dict the client got is at hand
        (it must equal `report.to_dict()`), to store that very object."""
        return cls(
            request_id=report.request_id,
            finished_at=finished_at,
            model=report.model,
            backend=backend,
            category=report.category,
            status=status,
            duration_s=report.duration_s,
            prompt_tokens=report.tokens.prompt,
            completion_tokens=report.tokens.completion,
            tokens_source=report.tokens.source,
            joules=report.energy_j,
            gpu_joules=report.gpu_j,
            cpu_joules=report.cpu_j,
            dynamic_joules=report.dynamic_j,
            joules_by_source=dict(joules_by_source or {}),
            method=report.method,
            carbon_intensity_g_per_kwh=report.intensity.g_per_kwh,
            carbon_intensity_source=report.intensity.source,
            co2eq_g=report.co2eq_g,
            embodied_g=report.embodied_g,
            sci_g=report.sci_g,
            energy=energy if energy is not None else report.to_dict(),
            tenant=tenant,
            client_request_id=client_request_id,
        )


# --- schema ------------------------------------------------------------------------------

# Column order of the `requests` table and of `_row()`; `energy` and `joules_by_source` are
# JSON text.
_COLUMNS = (
    "request_id",
    "finished_at",
    "model",
    "backend",
    "category",
    "status",
    "duration_s",
    "prompt_tokens",
    "completion_tokens",
    "tokens_source",
    "joules",
    "gpu_joules",
    "cpu_joules",
    "dynamic_joules",
    "joules_by_source",
    "method",
    "carbon_intensity_g_per_kwh",
    "carbon_intensity_source",
    "co2eq_g",
    "embodied_g",
    "sci_g",
    "energy",
    "tenant",
    "client_request_id",
)
_INSERT = (
    f"INSERT OR REPLACE INTO requests ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _COLUMNS)})"
)


@functools.lru_cache(maxsize=8)
def _insert_many(n: int) -> str:
    one = f"({', '.join('?' for _ in _COLUMNS)})"
    return f"INSERT OR REPLACE INTO requests ({', '.join(_COLUMNS)}) VALUES " + ", ".join([one] * n)


def _insert_batch(conn: sqlite3.Connection, batch: list[RequestRecord]) -> None:
    """Write `batch` in one transaction, as few multi-row INSERTs as SQLite's variable limit
    allows. Not `executemany`: it releases and retakes the GIL around every row, and each
    retake stalls the event loop's thread (measured: 13% of streamed throughput at 1.5k
    requests/s, against under 2% with one statement per batch; bench/overhead.py)."""
    per_stmt = max(1, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(_COLUMNS))
    conn.execute("BEGIN IMMEDIATE")
    try:
        for i in range(0, len(batch), per_stmt):
            part = batch[i : i + per_stmt]
            conn.execute(_insert_many(len(part)), [v for r in part for v in _row(r)])
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _migrate_v1(conn: sqlite3.Connection) -> None:
    # Numbers are nullable: SQLite stores a NaN as NULL, and one odd float must not make a
    # record unwritable.
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
    # Tenants (API key names) and the client's own request id, looked up by either id.
    conn.execute("ALTER TABLE requests ADD COLUMN tenant TEXT NOT NULL DEFAULT ''")
    conn.execute("ALTER TABLE requests ADD COLUMN client_request_id TEXT")
    conn.execute("CREATE INDEX requests_client_request_id ON requests (client_request_id)")


# Applied in order: migration i takes the schema from version i to version i + 1
# (`PRAGMA user_version`). Append only; never edit one that has shipped.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_migrate_v1, _migrate_v2)
SCHEMA_VERSION = len(MIGRATIONS)

# Errors that come from one record's data, not from the disk: retrying cannot help, so such a
# record is written alone, and dropped (logged, counted) if it still fails.
# (orjson.JSONEncodeError is a TypeError.)
_DATA_ERRORS: tuple[type[Exception], ...] = (
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,  # a value of a type SQLite cannot bind
    sqlite3.DataError,
    AttributeError,  # not a RequestRecord at all
    TypeError,
    ValueError,
    OverflowError,
)

_PRUNE_CHUNK_ROWS = 10_000  # rows per delete transaction, so the writer never waits long


def _row(r: RequestRecord) -> tuple[object, ...]:
    return (
        r.request_id,
        float(r.finished_at),
        r.model,
        r.backend,
        r.category,
        int(r.status),
        r.duration_s,
        r.prompt_tokens,
        r.completion_tokens,
        r.tokens_source,
        r.joules,
        r.gpu_joules,
        r.cpu_joules,
        r.dynamic_joules,
        orjson.dumps(r.joules_by_source).decode(),
        r.method,
        r.carbon_intensity_g_per_kwh,
        r.carbon_intensity_source,
        r.co2eq_g,
        r.embodied_g,
        r.sci_g,
        orjson.dumps(r.energy).decode(),
        r.tenant,
        r.client_request_id,
    )


def _connect(path: str, busy_timeout_s: float) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; every write says BEGIN IMMEDIATE itself,
    # which takes the write lock up front so busy_timeout applies (no lock-upgrade deadlock).
    conn = sqlite3.connect(
        path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
    )
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(
                f"request store {path!r}: SQLite refused WAL mode (got {mode!r}); "
                "use a file on a local filesystem for --db"
            )
        conn.execute("PRAGMA synchronous=NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection, path: str) -> None:
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read inside the write transaction: another process may have migrated meanwhile.
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"request store {path!r} has schema version {version}, newer than this "
                    f"energy-proxy knows ({SCHEMA_VERSION}); upgrade energy-proxy or point "
                    "--db at another file"
                )
            if version == SCHEMA_VERSION:
                conn.execute("ROLLBACK")
                return
            if (
                version == 0
                and conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE name NOT LIKE 'sqlite%' LIMIT 1"
                ).fetchone()
            ):
                # Someone else's database: do not add our tables to it.
                raise StoreError(
                    f"request store {path!r} holds tables but no energy-proxy schema version; "
                    "point --db at a new file"
                )
            MIGRATIONS[version](conn)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
            log.info("request store %s: schema migrated to version %d", path, version + 1)
        except BaseException:
            _rollback(conn)
            raise


def _probe_write(conn: sqlite3.Connection) -> None:
    # A schema already current needs no write at open; make sure writes are possible now
    # (read-only file, locked database) rather than failing later in the writer.
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DELETE FROM requests WHERE request_id = ''")
    finally:
        _rollback(conn)


# --- the store ---------------------------------------------------------------------------


class RequestStore:
    """Finished-request records in one SQLite file (WAL), written by a background thread.

    Thread-safe: `add` from any thread or task; reads from worker threads.
    `dropped` counts records that will never reach the disk: beyond `max_queue_records`
    not yet written, added after `close`, rejected by SQLite for their data, or still
    unwritable when `close` gave up. Each is logged.
    """

    def __init__(
        self,
        path: str,
        *,
        clock: Callable[[], float] = time.time,
        max_queue_records: int = 100_000,
        batch_records: int = 200,
        linger_s: float = 0.2,
        busy_timeout_s: float = 5.0,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 5.0,
    ) -> None:
        """Open (creating if needed) and migrate the database at `path`, then start the
        writer. Raises `StoreError` if that is impossible.

        `clock` gives unix seconds (for `prune`). The writer commits when `batch_records`
        are queued or `linger_s` after the first one waited, whichever comes first.
        `busy_timeout_s` is how long one SQLite call waits for another connection's lock.
        """
        if max_queue_records < 1 or batch_records < 1:
            raise ValueError("max_queue_records and batch_records must be at least 1")
        self.path = str(Path(path).expanduser())
        self.dropped = 0
        self._clock = clock
        self._max_queue = max_queue_records
        self._batch = batch_records
        self._linger_s = linger_s
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._busy_timeout_s = busy_timeout_s

        self._cond = threading.Condition()
        self._queue: deque[RequestRecord] = deque()
        # Every record not yet on disk (queued or in the batch being written), by id: `get`
        # must find answered requests before the writer gets to them.
        self._pending: dict[str, RequestRecord] = {}
        self._added_seq = 0  # records accepted so far
        self._done_seq = 0  # of those, written (or dropped, logged) by the writer
        self._flush_waiters = 0
        self._stopping = False
        self._closing = False  # close() has begun (it runs once)
        self._closed = False  # adds are refused, reads raise
        self._dropped_logged = 0
        self._warned_closed = False
        self._stop = threading.Event()

        self._read_lock = threading.Lock()
        self._write_conn, self._read_conn = self._open_connections(busy_timeout_s)
        self._thread = threading.Thread(
            target=self._run, name="energy-proxy-store-writer", daemon=True
        )
        self._thread.start()

    @classmethod
    def open(
        cls,
        path: str,
        *,
        clock: Callable[[], float] = time.time,
        max_queue_records: int = 100_000,
        batch_records: int = 200,
        linger_s: float = 0.2,
        busy_timeout_s: float = 5.0,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 5.0,
    ) -> RequestStore:
        """Same as the constructor."""
        return cls(
            path,
            clock=clock,
            max_queue_records=max_queue_records,
            batch_records=batch_records,
            linger_s=linger_s,
            busy_timeout_s=busy_timeout_s,
            retry_initial_s=retry_initial_s,
            retry_max_s=retry_max_s,
        )

    def _open_connections(
        self, busy_timeout_s: float
    ) -> tuple[sqlite3.Connection, sqlite3.Connection]:
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
            write_conn = _connect(path, busy_timeout_s)
            conns.append(write_conn)
            _migrate(write_conn, path)
            _probe_write(write_conn)
            read_conn = _connect(path, busy_timeout_s)
            conns.append(read_conn)
            read_conn.execute("SELECT COUNT(*) FROM requests WHERE 0").fetchone()
        except StoreError:
            for c in conns:
                c.close()
            raise
        except sqlite3.Error as e:
            for c in conns:
                c.close()
            raise StoreError(f"request store {path!r}: {_explain(e)}") from e
        return write_conn, read_conn

    # --- writing ---------------------------------------------------------------------

    def add(self, record: RequestRecord) -> None:
        """Queue `record` for the writer. O(1); never blocks on the disk, never raises."""
        with self._cond:
            if self._closed or self._added_seq - self._done_seq >= self._max_queue:
                self.dropped += 1
                if self._closed and not self._warned_closed:
                    # Only once: this runs on the request path.
                    self._warned_closed = True
                    log.warning("request store is closed; records added now are dropped")
                return
            self._queue.append(record)
            self._pending[record.request_id] = record
            self._added_seq += 1
            n = len(self._queue)
            # Wake the writer for a first record (it starts the linger) or a full batch.
            if n == 1 or n == self._batch:
                self._cond.notify_all()

    @property
    def queued(self) -> int:
        """Records accepted but not yet written."""
        with self._cond:
            return self._added_seq - self._done_seq

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every record added before this call is on disk (or dropped, logged).

        False if that did not happen within `timeout_s` (the writer keeps retrying)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            target = self._added_seq
            if self._done_seq >= target:
                return True
            if not self._thread.is_alive():
                return False
            self._flush_waiters += 1
            self._cond.notify_all()
            try:
                while self._done_seq < target:
                    remaining_s = deadline - time.monotonic()
                    if remaining_s <= 0 or not self._thread.is_alive():
                        return False
                    self._cond.wait(min(remaining_s, 0.5))
                return True
            finally:
                self._flush_waiters -= 1

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush (waiting up to `timeout_s`), stop the writer and close both connections.

        Idempotent. Records the writer still cannot write after that are logged as lost and
        counted in `dropped`."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
        if not self.flush(timeout_s):
            log.error(
                "request store %s: %d records not yet written at close; trying once more",
                self.path,
                self.queued,
            )
        with self._cond:
            self._closed = True
            self._stopping = True
            self._cond.notify_all()
        self._stop.set()
        # The writer finishes the attempt under way, makes one more and gives up on the whole
        # queue if that fails: two busy timeouts at most.
        self._thread.join(timeout=timeout_s + 2.0 * self._busy_timeout_s + 1.0)
        if self._thread.is_alive():
            log.error("request store %s: writer thread did not stop", self.path)
        with self._read_lock:
            self._read_conn.close()

    def __enter__(self) -> RequestStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- the writer thread -----------------------------------------------------------

    def _run(self) -> None:
        conn = self._write_conn
        batch: list[RequestRecord] = []
        backoff_s = self._retry_initial_s
        try:
            while True:
                if not batch:
                    batch = self._take_batch()
                    if not batch:
                        return  # stopping, and everything is written
                try:
                    rejected = self._write(conn, batch)
                except Exception as e:
                    if self._stop.is_set():
                        self._give_up(batch, e)
                        batch = []
                        continue
                    log.warning(
                        "request store %s: writing %d records failed (%s); retrying in %.2f s, "
                        "%d waiting",
                        self.path,
                        len(batch),
                        _explain(e),
                        backoff_s,
                        self.queued,
                    )
                    self._stop.wait(backoff_s)
                    backoff_s = min(backoff_s * 2.0, self._retry_max_s)
                    self._log_drops()
                    continue
                backoff_s = self._retry_initial_s
                for r in rejected:
                    log.error(
                        "request store %s: record %s rejected for its data; dropped",
                        self.path,
                        r.request_id,
                    )
                self._done(batch, lost=len(rejected))
                batch = []
                self._log_drops()
        finally:
            conn.close()

    def _take_batch(self) -> list[RequestRecord]:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return []
            deadline = time.monotonic() + self._linger_s
            while (
                len(self._queue) < self._batch and not self._stopping and self._flush_waiters == 0
            ):
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    break
                self._cond.wait(remaining_s)
            n = min(self._batch, len(self._queue))
            return [self._queue.popleft() for _ in range(n)]

    def _write(self, conn: sqlite3.Connection, batch: list[RequestRecord]) -> list[RequestRecord]:
        """Write `batch` in one transaction; return the records rejected for their data.

        Errors from the disk or locks propagate (the caller retries the whole batch)."""
        try:
            _insert_batch(conn, batch)
            return []
        except _DATA_ERRORS:
            pass
        # Some record is bad: write them one by one so the others still land.
        rejected: list[RequestRecord] = []
        for r in batch:
            try:
                _transaction(conn, _INSERT, _row(r))
            except _DATA_ERRORS:
                rejected.append(r)
        return rejected

    def _done(self, batch: Iterable[RequestRecord], *, lost: int) -> None:
        with self._cond:
            n = 0
            for r in batch:
                n += 1
                if self._pending.get(r.request_id) is r:
                    del self._pending[r.request_id]
            self._done_seq += n
            self.dropped += lost
            self._cond.notify_all()

    def _give_up(self, batch: list[RequestRecord], e: Exception) -> None:
        # Closing and the disk still fails: one failed attempt is enough, for the whole
        # queue, or shutdown would take a busy timeout per batch.
        with self._cond:
            rest = list(self._queue)
            self._queue.clear()
        lost = [*batch, *rest]
        log.error(
            "request store %s: closing with %d records that cannot be written (%s); lost",
            self.path,
            len(lost),
            _explain(e),
        )
        self._done(lost, lost=len(lost))

    def _log_drops(self) -> None:
        with self._cond:
            new = self.dropped - self._dropped_logged
            self._dropped_logged = self.dropped
        if new > 0:
            log.error(
                "request store %s: %d records dropped (%d in all); the queue holds at most "
                "%d unwritten records",
                self.path,
                new,
                self._dropped_logged,
                self._max_queue,
            )

    # --- reading ---------------------------------------------------------------------

    def get(self, request_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """The energy object the client was told, by the proxy's id or the client's own
        x-request-id; None if unknown. `tenant`: only that tenant's requests (None: any,
        for admins). Several requests of the tenant under one client id: the latest.

        Records still queued are found too. Raises `StoreError` after `close`."""
        with self._cond:
            pending = self._pending.get(request_id)
            if pending is not None and tenant is not None and pending.tenant != tenant:
                pending = None  # another tenant's: as good as unknown
            if pending is None:
                pending = next(
                    (
                        r
                        for r in reversed(self._pending.values())
                        if r.client_request_id == request_id
                        and (tenant is None or r.tenant == tenant)
                    ),
                    None,
                )
        if pending is not None:
            return dict(pending.energy)
        scope, params = ("", ()) if tenant is None else (" AND tenant = ?", (tenant,))
        rows = self._read(
            f"SELECT energy FROM requests WHERE request_id = ?{scope} "
            f"UNION ALL SELECT energy FROM (SELECT energy FROM requests "
            f"WHERE client_request_id = ?{scope} ORDER BY finished_at DESC LIMIT 1)",
            (request_id, *params, request_id, *params),
        )
        if not rows:
            return None
        energy: dict[str, Any] = orjson.loads(rows[0][0])
        return energy

    def summary(
        self, min_count: int = 1, *, tenant: str | None = None, flush_timeout_s: float = 10.0
    ) -> list[dict[str, Any]]:
        """Per model x category over successful requests (status 200), sorted by both:
        `{"model", "category", "count", "mean_joules", "mean_joules_per_token",
        "mean_co2eq_g"}`. Groups with fewer than `min_count` requests are left out.

        `mean_joules_per_token` is total joules / total tokens, a request's tokens being its
        completion tokens, or its prompt tokens when it completed none (embeddings) - the
        rule of `EnergyReport.joules_per_token`. Requests with neither count only in `count`,
        `mean_joules` and `mean_co2eq_g`; None when no request of the group has tokens.
        Flushes the queue first, so everything answered so far is included. `tenant`:
        only that tenant's requests (None: everyone's).
        """
        if not self.flush(flush_timeout_s):
            log.warning("request store %s: summary without %d unwritten", self.path, self.queued)
        rows = self._read(
            """
            SELECT model, category, COUNT(*), AVG(joules), AVG(co2eq_g),
                   SUM(CASE WHEN n > 0 THEN joules END), SUM(CASE WHEN n > 0 THEN n END)
            FROM (
                SELECT model, category, joules, co2eq_g,
                       CASE WHEN completion_tokens > 0 THEN completion_tokens
                            ELSE COALESCE(prompt_tokens, 0) END AS n
                FROM requests WHERE status = 200 AND (? IS NULL OR tenant = ?)
            )
            GROUP BY model, category HAVING COUNT(*) >= ?
            ORDER BY model, category
            """,
            (tenant, tenant, min_count),
        )
        out: list[dict[str, Any]] = []
        for model, category, count, mean_j, mean_co2_g, tok_j, tokens in rows:
            out.append(
                {
                    "model": model,
                    "category": category,
                    "count": int(count),
                    "mean_joules": mean_j,
                    "mean_joules_per_token": tok_j / tokens if tokens else None,
                    "mean_co2eq_g": mean_co2_g,
                }
            )
        return out

    def count(self, *, flush_timeout_s: float = 10.0) -> int:
        """Stored records (the queue is flushed first)."""
        self.flush(flush_timeout_s)
        return int(self._read("SELECT COUNT(*) FROM requests", ())[0][0])

    def prune(self, older_than_s: float, *, flush_timeout_s: float = 10.0) -> int:
        """Delete records finished more than `older_than_s` before now (`clock()`); return
        how many. Deletes in chunks, each its own transaction, so the writer waits briefly."""
        self.flush(flush_timeout_s)
        cutoff = self._clock() - older_than_s
        deleted = 0
        with self._read_lock:
            conn = self._check_open()
            try:
                while True:
                    n = _transaction(
                        conn,
                        "DELETE FROM requests WHERE rowid IN (SELECT rowid FROM requests "
                        "WHERE finished_at < ? LIMIT ?)",
                        (cutoff, _PRUNE_CHUNK_ROWS),
                    )
                    deleted += n
                    if n < _PRUNE_CHUNK_ROWS:
                        break
            except sqlite3.Error as e:
                raise StoreError(f"request store {self.path!r}: prune: {_explain(e)}") from e
        if deleted:
            log.info("request store %s: pruned %d records before %.0f", self.path, deleted, cutoff)
        return deleted

    def _read(self, sql: str, params: tuple[object, ...]) -> list[Any]:
        with self._read_lock:
            conn = self._check_open()
            try:
                return conn.execute(sql, params).fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"request store {self.path!r}: {_explain(e)}") from e

    def _check_open(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError(f"request store {self.path!r} is closed")
        return self._read_conn


def _transaction(conn: sqlite3.Connection, sql: str, params: Any) -> int:
    """Run one statement in its own write transaction; rows changed."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        cur = conn.execute(sql, params)
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return cur.rowcount


def _rollback(conn: sqlite3.Connection) -> None:
    # Never let a failed ROLLBACK hide the error that caused it.
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _explain(e: BaseException) -> str:
    msg = str(e) or type(e).__name__
    low = msg.lower()
    if "not a database" in low or "malformed" in low:
        return f"{msg} (the file is not an energy-proxy database or is damaged)"
    if "locked" in low or "busy" in low:
        return f"{msg} (another process holds a lock on it)"
    if "unable to open" in low or "readonly" in low or "read-only" in low:
        return f"{msg} (check that the path and its directory are writable)"
    if "disk is full" in low or "full" in low:
        return f"{msg} (no space left on the device)"
    return msg
