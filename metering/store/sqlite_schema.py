"""The SQLite request store's schema (versioned migrations, the rollup tables and their
rebuild), its SQL, and how its connections are opened; the database itself is sqlite.py."""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import urllib.parse
from collections.abc import Callable, Sequence

from metering.accounting.report import DEFAULT_ENDPOINT
from metering.store.columns import COLUMNS, COLUMNS_FIRST
from metering.store.records import StoreError, id_key

JOURNAL_SIZE_LIMIT_BYTES = 16 * 1024 * 1024  # the WAL is truncated to this after a checkpoint
ROLLUP_SUMS = ("count", "joules", "co2eq_g", "token_joules", "tokens")


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
        INSERT OR IGNORE INTO records ({", ".join(COLUMNS_FIRST)})
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


def _migrate_v4(conn: sqlite3.Connection) -> None:
    # The uncertainty band of each record and what its split rested on (a label; "" for
    # the records written before).
    conn.execute("INSERT OR IGNORE INTO labels (text) VALUES ('')")
    (empty,) = conn.execute("SELECT id FROM labels WHERE text = ''").fetchone()
    conn.execute("ALTER TABLE records ADD COLUMN band_rel REAL")
    conn.execute(
        f"ALTER TABLE records ADD COLUMN attribution_basis INTEGER NOT NULL DEFAULT {int(empty)}"
    )


def _migrate_v5(conn: sqlite3.Connection) -> None:
    # The API each record's request called (a label) and whether it shared its backend with
    # work the proxy did not send. The records written before were chat, completions and
    # embeddings, not told apart: they read as "chat", the documented default, and as
    # not known to have shared (NULL).
    conn.execute("INSERT OR IGNORE INTO labels (text) VALUES (?)", (DEFAULT_ENDPOINT,))
    (chat,) = conn.execute("SELECT id FROM labels WHERE text = ?", (DEFAULT_ENDPOINT,)).fetchone()
    conn.execute(f"ALTER TABLE records ADD COLUMN endpoint INTEGER NOT NULL DEFAULT {int(chat)}")
    conn.execute("ALTER TABLE records ADD COLUMN shared_with_untracked INTEGER")


def _migrate_v6(conn: sqlite3.Connection) -> None:
    # What the embodied figure behind each record's embodied_g was (a label; "" for the
    # records written before, which read as not said).
    conn.execute("INSERT OR IGNORE INTO labels (text) VALUES ('')")
    (empty,) = conn.execute("SELECT id FROM labels WHERE text = ''").fetchone()
    conn.execute(
        f"ALTER TABLE records ADD COLUMN embodied_basis INTEGER NOT NULL DEFAULT {int(empty)}"
    )


def _migrate_v7(conn: sqlite3.Connection) -> None:
    # Per hour and tenant, the energy of every request whatever its status: what budgets
    # count (the rollups count successful requests only). Filled from the records kept.
    conn.execute(
        """
        CREATE TABLE tenant_usage (
            hour INTEGER NOT NULL,
            tenant INTEGER NOT NULL,
            joules REAL NOT NULL,
            co2eq_g REAL NOT NULL,
            PRIMARY KEY (hour, tenant)
        ) WITHOUT ROWID
        """
    )
    conn.execute(
        "INSERT INTO tenant_usage (hour, tenant, joules, co2eq_g) "
        "SELECT finished_ms / 3600000, tenant, TOTAL(joules), TOTAL(co2eq_g) "
        "FROM records GROUP BY 1, 2"
    )


def _migrate_v8(conn: sqlite3.Connection) -> None:
    # The routing policy and why each record's request went to its backend (a label; ""
    # for the records written before, which were not routed among backends).
    conn.execute("INSERT OR IGNORE INTO labels (text) VALUES ('')")
    (empty,) = conn.execute("SELECT id FROM labels WHERE text = ''").fetchone()
    conn.execute(f"ALTER TABLE records ADD COLUMN route INTEGER NOT NULL DEFAULT {int(empty)}")


# Applied in order: migration i takes the schema from version i to version i + 1
# (`PRAGMA user_version`). Append only; never edit one that has shipped.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _migrate_v1,
    _migrate_v2,
    _migrate_v3,
    _migrate_v4,
    _migrate_v5,
    _migrate_v6,
    _migrate_v7,
    _migrate_v8,
)
SCHEMA_VERSION = len(MIGRATIONS)


@functools.lru_cache(maxsize=16)
def insert_records_sql(n: int) -> str:
    one = f"({', '.join('?' for _ in COLUMNS)})"
    return (
        f"INSERT INTO records ({', '.join(COLUMNS)}) VALUES {', '.join([one] * n)} "
        "ON CONFLICT (rid) DO NOTHING RETURNING rid"
    )


@functools.lru_cache(maxsize=64)
def upsert_rollups_sql(table: str, period: str, n: int) -> str:
    one = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    sums = ", ".join(f"{c} = {c} + excluded.{c}" for c in ROLLUP_SUMS)
    return (
        f"INSERT INTO {table} ({period}, model, category, backend, tenant, "
        f"{', '.join(ROLLUP_SUMS)}) VALUES {', '.join([one] * n)} "
        f"ON CONFLICT ({period}, model, category, backend, tenant) DO UPDATE SET {sums}"
    )


SELECT_RECORD = f"SELECT {', '.join(COLUMNS)} FROM records"


@functools.lru_cache(maxsize=16)
def upsert_tenant_usage_sql(n: int) -> str:
    return (
        "INSERT INTO tenant_usage (hour, tenant, joules, co2eq_g) VALUES "
        f"{', '.join(['(?, ?, ?, ?)'] * n)} ON CONFLICT (hour, tenant) DO UPDATE SET "
        "joules = joules + excluded.joules, co2eq_g = co2eq_g + excluded.co2eq_g"
    )


# --- connections -------------------------------------------------------------------------


# The proxy's own VFS: SQLite's "unix-excl" keeps the WAL index in the process's heap,
# not in a `-shm` file mapped into memory. A mapped file that shrinks or cannot grow under
# SQLite (truncated, replaced, a full tmpfs) kills the process with SIGBUS; heap memory
# cannot. The price: one process at a time holds the file (the proxy's own connections
# share it); another proxy on the same file is refused at start with a clear error.
EXCLUSIVE_VFS = "unix-excl"


def _uri(path: str, vfs: str) -> str:
    return f"file:{urllib.parse.quote(os.path.abspath(path))}?vfs={vfs}"


def connect(path: str, busy_timeout_s: float) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; every write says BEGIN IMMEDIATE itself,
    # which takes the write lock up front so busy_timeout applies (no lock-upgrade deadlock).
    try:
        conn = sqlite3.connect(
            _uri(path, EXCLUSIVE_VFS),
            uri=True,
            timeout=busy_timeout_s,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.OperationalError as e:
        if "no such vfs" not in str(e):
            raise
        # A SQLite built without it (not a unix build): the shared-memory index, as before.
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
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT_BYTES}")
    except BaseException:
        conn.close()
        raise
    return conn


def rollback(conn: sqlite3.Connection) -> None:
    # Never let a failed ROLLBACK hide the error that caused it.
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def checkpoint(conn: sqlite3.Connection, *, wait: bool = True) -> None:
    """Copy the log into the database and start it again from its beginning, its file
    kept: on a full disk the next transactions reuse its blocks (what readers still
    hold stays: a busy checkpoint is not an error). Without `wait`, what no reader holds
    is copied at once (no wait for readers; the next write starts the log again)."""
    mode = "RESTART" if wait else "PASSIVE"
    conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()


def transaction(conn: sqlite3.Connection, sql: str, params: Sequence[object] = ()) -> int:
    """Run one statement in its own write transaction; rows changed."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        cur = conn.execute(sql, params)
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    return cur.rowcount


def explain(e: BaseException) -> str:
    msg = str(e) or type(e).__name__
    low = msg.lower()
    if "not a database" in low or "malformed" in low:
        return f"{msg} (the file is not an energy-proxy database or is damaged)"
    if "locked" in low or "busy" in low:
        return (
            f"{msg} (another process holds it: each energy-proxy needs its own SQLite --db; "
            "a fleet shares one PostgreSQL store)"
        )
    if "unable to open" in low or "readonly" in low or "read-only" in low:
        return f"{msg} (check that the path and its directory are writable)"
    if "full" in low:
        return f"{msg} (no space left: the size limit, --db-max-mb, or the disk)"
    if "disk i/o" in low:
        return f"{msg} (the filesystem refused a write: a full disk or a file size limit)"
    return msg
