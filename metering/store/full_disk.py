"""A SQLite store on a full disk: the room it makes, and the space it sets aside for that.

In write-ahead-log mode a delete is itself a write: on a disk with no byte free, the
store could neither write nor drop old records to make room. So the store sets a reserve
aside at start (`Reserve`: room for a checkpoint of the log at its fullest, and the first
deletes), gives it back when the disk is full, drops its oldest records in checkpointed
chunks, gives their pages back to the filesystem until the reserve can be set aside again,
and from then on ("tight") moves each batch into the file at once, so that the next full
disk finds the log holding at most one batch. The log's budget (`wal_budget_bytes`) is a
share of the size limit and of the disk.
"""

from __future__ import annotations

import logging
import math
import shutil
import sqlite3
from pathlib import Path

from metering.store.reserve import RESERVE_BYTES, Reserve
from metering.store.sqlite_schema import checkpoint, rollback, transaction

log = logging.getLogger("energy_proxy.store")

MIN_MAKE_ROOM_ROWS = 1_000
MAKE_ROOM_FRACTION = 0.05  # of the records, dropped when the file is full
_MAKE_ROOM_CHUNK_ROWS = 500  # per transaction, so a full disk's log never needs much
_VACUUM_STEP_PAGES = 64

# The write-ahead log's share of --db-max-mb: a fifth, from 64 KiB to 16 MiB, and at most
# a 16th of the disk (what a full disk's reserve must hold is half of it: on a small disk
# a large log would leave too few records to give that back).
WAL_SHARE = 0.2
WAL_MIN_BYTES = 64 * 1024
WAL_MAX_BYTES = 16 * 1024 * 1024
WAL_DISK_SHARE = 1 / 16


def wal_budget_bytes(max_bytes: int, disk_bytes: int | None = None) -> int:
    """The bytes the write-ahead log may hold of a store limited to `max_bytes`, on a
    disk of `disk_bytes` (None: unknown)."""
    budget = min(WAL_MAX_BYTES, WAL_SHARE * max_bytes)
    if disk_bytes is not None:
        budget = min(budget, WAL_DISK_SHARE * disk_bytes)
    return int(max(WAL_MIN_BYTES, budget))


def disk_bytes(path: str) -> int | None:
    """The size of the filesystem that holds `path` (None: unknown)."""
    try:
        return shutil.disk_usage(Path(path).resolve().parent).total
    except OSError:
        return None


def _free_bytes(path: str) -> int:
    try:
        return shutil.disk_usage(Path(path).parent).free
    except OSError:
        return 0


def is_full(error: BaseException) -> bool:
    """Whether `error` is SQLite's "database or disk is full"."""
    return (
        isinstance(error, sqlite3.OperationalError)
        and getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    )


class FullDisk:
    """The full-disk side of one SQLite store (its writer's thread only)."""

    def __init__(self, path: str, wal_bytes: int) -> None:
        self.path = path
        self.wal_bytes = wal_bytes
        # Room for a checkpoint of the log at its fullest (what it adds to the file) and
        # the first deletes.
        self.reserve = Reserve(Path(path + ".reserve"), wal_bytes // 2 + RESERVE_BYTES // 4)
        self.reserve.take()
        self.tight = False  # the disk was full: each batch checkpointed
        self._wanted = False

    def wanted(self) -> bool:
        """Whether room should be made now (asked once: the answer is reset)."""
        wanted, self._wanted = self._wanted, False
        return wanted

    def after_commit(self, conn: sqlite3.Connection) -> None:
        """On a disk that was full, each batch into the file at once (not waiting for
        readers): the next time it is full, the log then holds nothing a checkpoint must
        grow the file for, and making room needs next to no space. Until the disk has
        room again, when the reserve is made whole again. The batch is committed: a
        checkpoint that fails is never the batch's failure."""
        if not self.tight:
            return
        try:
            checkpoint(conn, wait=False)
        except sqlite3.Error as e:
            if is_full(e):
                # Left in the log: room is made now, while it holds one batch (the
                # reserve is room for what that adds to the file), not once it is full.
                self._wanted = True
            else:
                log.warning("request store %s: checkpoint failed: %s", self.path, e)
            return
        if _free_bytes(self.path) >= self.reserve.size_bytes + self.wal_bytes:
            self.tight = not self.reserve.take(leave_bytes=0)

    def make_room(self, conn: sqlite3.Connection) -> int:
        """The oldest records dropped, in chunks each checkpointed (on a full disk the
        log has only the reserve to grow into), after giving the reserve back; then the
        reserve set aside again from what that freed: pages given back to the filesystem
        a step at a time (the rest kept for the next records), more records dropped where
        that is not enough. A disk that another program keeps full must leave the next
        full disk the room to make room. How many records were dropped."""
        rollback(conn)
        self.tight = True
        self.reserve.release()
        try:
            return self._drop_for_room(conn)
        finally:
            # Whatever happened, the space set aside again, what there is of it: else the
            # next records take it, and the next full disk has none to make room with.
            self.reserve.take(leave_bytes=0, partly=True)

    def _drop_for_room(self, conn: sqlite3.Connection) -> int:
        # The log into the file first (the reserve is room for what that adds to it),
        # so that the deletes reuse the log's own blocks.
        checkpoint(conn)
        lo, hi = conn.execute("SELECT MIN(rowid), MAX(rowid) FROM records").fetchone()
        if lo is None:
            return 0
        stored = hi - lo + 1  # ids only grow, and only the oldest are dropped
        # A share of the records, and never the newest: a small store on a full disk
        # keeps half of what it has (the reserve's loop below, a quarter, at least one).
        target = min(max(MIN_MAKE_ROOM_ROWS, math.ceil(stored * MAKE_ROOM_FRACTION)), stored // 2)
        most = min(2 * target, stored - max(1, stored // 4))
        dropped = _drop_chunk(conn, target)
        # Without incremental vacuum (a file from before it) freed pages stay in the
        # file: dropping more gives the filesystem nothing.
        incremental = int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2
        while incremental and not self.reserve.take(leave_bytes=0):
            if _give_pages_back(conn):
                continue
            if dropped >= most:
                break  # the reserve is taken in part (`make_room`)
            n = _drop_chunk(conn, min(_MAKE_ROOM_CHUNK_ROWS, most - dropped))
            if n == 0:
                break
            dropped += n
        return dropped

    def last_checkpoint(self, conn: sqlite3.Connection) -> None:
        """At close; on a full disk, with the reserve given back for it (the reserve is
        for a store that writes on; the next start takes it again)."""
        try:
            checkpoint(conn)
        except sqlite3.Error as e:
            if not is_full(e):
                log.warning("request store %s: the last checkpoint failed: %s", self.path, e)
                return
            self.reserve.release()
            try:
                checkpoint(conn)
            except sqlite3.Error as e2:
                log.warning("request store %s: the last checkpoint failed: %s", self.path, e2)


def _drop_chunk(conn: sqlite3.Connection, rows: int) -> int:
    """Up to `rows` of the oldest records deleted, `_MAKE_ROOM_CHUNK_ROWS` per transaction,
    each checkpointed before the next; how many."""
    dropped = 0
    while dropped < rows:
        n = transaction(
            conn,
            "DELETE FROM records WHERE rowid IN (SELECT rowid FROM records ORDER BY rowid LIMIT ?)",
            (min(_MAKE_ROOM_CHUNK_ROWS, rows - dropped),),
        )
        if n == 0:
            break
        dropped += n
        checkpoint(conn)
    return dropped


def _give_pages_back(conn: sqlite3.Connection) -> int:
    """Up to `_VACUUM_STEP_PAGES` free pages returned to the filesystem (the moves go
    through the log, checkpointed); how many."""
    free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    if not free:
        return 0
    conn.execute(f"PRAGMA incremental_vacuum({_VACUUM_STEP_PAGES})").fetchall()
    checkpoint(conn)
    return max(0, free - int(conn.execute("PRAGMA freelist_count").fetchone()[0]))
