"""The request store: every finished request's record, durable, off the request path.

`RequestStore.add()` only appends to an in-memory queue (O(1), never touches the database
and never raises); a dedicated writer thread drains the queue in batches, one transaction
each, into SQLite (the embedded default) or PostgreSQL (one store for a fleet). A failing
write (disk full, database locked, PostgreSQL restarting) is logged and retried with
backoff, the records kept, up to `max_queue_records` unwritten; beyond that new records are
dropped and counted (`dropped`, the metric energy_proxy_store_dropped_records_total, and
`/readyz`). When the database has no room (its size limit or the disk) the oldest records
are dropped to make some (`evicted`): the rollups keep counting them. Everything queued is
written by `flush()` and by `close()`, which the app calls on shutdown.

Reads (`get`, `summary`, `count`, `prune`) may block briefly: call them from a thread
(`asyncio.to_thread`), never on the event loop. `get` and `summary` see records still
queued, so an answered request is found, and counted, at once. Records hold ids, labels
and numbers only, never prompt or completion text.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from metering.store.database import Database
from metering.store.journal import Journal, delete, read_segment
from metering.store.placement import POSTGRES_SCHEMES, default_max_bytes, journal_prefix
from metering.store.records import RequestRecord, StoreError
from metering.store.rollup import by_model_category, hour_of, rollup, summary_rows
from metering.store.status import StoreStatus

log = logging.getLogger("energy_proxy.store")

FAILURE_LOG_EVERY_S = 60.0


class RequestStore:
    """Finished-request records in a `Database`, written by a background thread.
    Thread-safe: `add` from any thread or task; reads from worker threads."""

    def __init__(
        self,
        db: Database,
        *,
        clock: Callable[[], float] = time.time,
        max_queue_records: int = 100_000,
        batch_records: int = 500,
        linger_s: float = 0.2,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 5.0,
        maintain_every_s: float = 10.0,
        close_grace_s: float = 10.0,
        max_mb: float | None = None,
        journal: Journal | None = None,
    ) -> None:
        """Start writing to `db` (opened). The writer commits when `batch_records` are
        queued or `linger_s` after the first one waited, whichever comes first. `clock`
        gives unix seconds (for `prune`). `journal`: each record handed to the operating
        system as it is added (metering/store/journal.py); what an earlier process left
        in it is written first."""
        if max_queue_records < 1 or batch_records < 1:
            raise ValueError("max_queue_records and batch_records must be at least 1")
        self.db = db
        self.where = db.where
        self.dropped = 0
        self.evicted = 0
        self._max_mb = max_mb
        self._clock = clock
        self._max_queue = max_queue_records
        self._batch = batch_records
        self._linger_s = linger_s
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._maintain_every_s = maintain_every_s
        self._close_grace_s = close_grace_s

        self._cond = threading.Condition()
        self._queue: deque[RequestRecord] = deque()
        # Every record not yet committed (queued or in the batch being written), by id: `get`
        # and `summary` must see answered requests before the writer gets to them.
        self._pending: dict[str, RequestRecord] = {}
        # Held across a batch's commit and its removal from `_pending`, and across a
        # summary's two reads (pending, then the database): no batch counted twice or not
        # at all.
        self._commit_lock = threading.Lock()
        self._added_seq = 0  # records accepted so far
        self._done_seq = 0  # of those, written (or dropped, logged) by the writer
        self._flush_waiters = 0
        self._stopping = False
        self._closing = False  # close() has begun (it runs once)
        self._closed = False  # adds are refused, reads raise
        self._dropped_logged = 0
        self._warned_closed = False
        self._last_error: str | None = None
        self._failures = 0  # failed attempts in a row
        self._failure_logged_at = 0.0
        self._stop = threading.Event()
        self._journal = journal
        self._journal_warned = False
        self._lost_at_close = 0
        if journal is not None:
            self._replay(journal)
        self._thread = threading.Thread(
            target=self._run, name="energy-proxy-store-writer", daemon=True
        )
        self._thread.start()

    @classmethod
    def open(
        cls,
        db: str,
        *,
        max_mb: float | None = None,
        busy_timeout_s: float = 5.0,
        journal: str | None = None,
        **kwargs: Any,
    ) -> RequestStore:
        """Open the store at `db`: a SQLite file path, or a `postgresql://` URL. Raises
        `StoreError` (with what to do) when that is impossible. `max_mb`: the size limit
        in megabytes (None: `default_max_bytes`). `journal`: "auto" (beside the database,
        `journal_prefix`), "off", or a path prefix; None: off."""
        max_bytes = default_max_bytes(db) if max_mb is None else round(max_mb * 1e6)
        database: Database
        if db.startswith(POSTGRES_SCHEMES):
            from metering.store.postgres import PostgresDatabase

            database = PostgresDatabase(db, max_bytes=max_bytes, timeout_s=busy_timeout_s)
        else:
            from metering.store.sqlite import SqliteDatabase

            database = SqliteDatabase(db, max_bytes=max_bytes, busy_timeout_s=busy_timeout_s)
        prefix = journal_prefix(db, journal)
        return cls(
            database,
            max_mb=max_bytes / 1e6,
            journal=None if prefix is None else Journal(prefix),
            **kwargs,
        )

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
            key = getattr(record, "request_id", None)
            if type(key) is str:  # else not a record: the writer refuses it (logged, counted)
                self._pending[key] = record
            self._added_seq += 1
            journal = self._journal
            if journal is not None and not journal.append(record, self._added_seq):
                self._warn_journal(journal)
            n = len(self._queue)
            # Wake the writer for a first record (it starts the linger) or a full batch.
            if n == 1 or n == self._batch:
                self._cond.notify_all()

    def _warn_journal(self, journal: Journal) -> None:
        if not self._journal_warned:  # once: this runs on the request path
            self._journal_warned = True
            log.warning(
                "request store %s: the journal %s refuses records (disk full or read-only?); "
                "until it takes them again, records not yet written are lost if the process "
                "is killed",
                self.where,
                journal.prefix,
            )

    def _replay(self, journal: Journal) -> None:
        """What a process that ended before writing everything left in the journal:
        queued first (the database ignores records it has)."""
        replayed = 0
        for path in journal.leftovers():
            records = read_segment(path)
            for record in records:
                self._queue.append(record)
                self._pending[record.request_id] = record
                self._added_seq += 1
            replayed += len(records)
            journal.adopt(path, self._added_seq)
        if replayed:
            log.warning(
                "request store %s: %d records from the journal %s (a process that ended "
                "before writing them): writing them now",
                self.where,
                replayed,
                journal.prefix,
            )

    @property
    def queued(self) -> int:
        """Records accepted but not yet written."""
        with self._cond:
            return self._added_seq - self._done_seq

    def status(self) -> StoreStatus:
        with self._cond:
            return StoreStatus(
                kind=self.db.kind,
                where=self.where,
                queued=self._added_seq - self._done_seq,
                dropped=self.dropped,
                evicted=self.evicted,
                writing=self._last_error is None,
                last_error=self._last_error,
                max_mb=self._max_mb,
                journal=None if self._journal is None else str(self._journal.prefix),
                journal_failed=0 if self._journal is None else self._journal.failures,
            )

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every record added before this call is stored (or dropped, logged);
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
        """Flush (waiting up to `timeout_s`), stop the writer and close the database.

        Idempotent. Records the writer still cannot write after that are logged as lost and
        counted in `dropped`."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
        if not self.flush(timeout_s):
            log.error(
                "request store %s: %d records not yet written at close; trying once more",
                self.where,
                self.queued,
            )
        with self._cond:
            self._closed = True
            self._stopping = True
            self._cond.notify_all()
        self._stop.set()
        # The writer finishes the attempt under way, makes one more and gives up on the whole
        # queue if that fails.
        self._thread.join(timeout=timeout_s + self._close_grace_s + 1.0)
        alive = self._thread.is_alive()
        if alive:
            log.error("request store %s: writer thread did not stop", self.where)
        self.db.close_reader()
        if self._journal is not None:
            with self._cond:
                written = not alive and self._lost_at_close == 0 and not self._queue
                done = self._journal.close(everything_written=written)
            delete(done)
            if not written:
                log.warning(
                    "request store %s: the records not written are kept in the journal %s, "
                    "written at the next start",
                    self.where,
                    self._journal.prefix,
                )

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
        db = self.db
        batch: list[RequestRecord] = []
        backoff_s = self._retry_initial_s
        next_maintain = time.monotonic() + self._maintain_every_s
        try:
            while True:
                if not batch:
                    batch = self._take_batch()
                    if not batch:
                        return  # stopping, and everything is written
                try:
                    written = db.write(batch)
                    with self._commit_lock:
                        db.commit()
                        if db.room_wanted():  # before the batch is done: flush sees it
                            self._make_room("the disk is full")
                        recovered = self._done(batch, lost=len(written.rejected), ok=True)
                except Exception as e:
                    db.rollback()
                    if db.is_full(e) and self._make_room(e):
                        continue  # written again at once, into the room made
                    self._failed(e)
                    if self._stop.is_set():
                        self._give_up(batch, e)
                        batch = []
                        continue
                    self._log_failure(e, len(batch), backoff_s)
                    self._stop.wait(backoff_s)
                    backoff_s = min(backoff_s * 2.0, self._retry_max_s)
                    self._log_drops()
                    continue
                if recovered:
                    log.warning(
                        "request store %s: writing again (after %d failed attempts)",
                        self.where,
                        recovered,
                    )
                backoff_s = self._retry_initial_s
                for r in written.rejected:
                    log.error(
                        "request store %s: record %s refused for its data; dropped",
                        self.where,
                        getattr(r, "request_id", repr(r)[:80]),
                    )
                batch = []
                self._log_drops()
                if time.monotonic() >= next_maintain:
                    next_maintain = time.monotonic() + self._maintain_every_s
                    self._maintain()
        finally:
            db.close_writer()

    def _make_room(self, e: Exception | str) -> bool:
        # The journal pauses: what is freed is the database's (the journal would take it).
        self._pause_journal(True)
        try:
            n = self.db.make_room()
        except Exception as e2:
            log.warning(
                "request store %s: no room, and dropping old records failed: %s", self.where, e2
            )
            return False
        finally:
            self._pause_journal(False)
        if n:
            with self._cond:
                self.evicted += n
            log.warning(
                "request store %s is full (%s): dropped its %d oldest records (the summaries "
                "and ratings still count them)",
                self.where,
                e,
                n,
            )
        return n > 0

    def _pause_journal(self, paused: bool) -> None:
        with self._cond:
            if self._journal is not None:
                self._journal.paused = paused

    def _maintain(self) -> None:
        try:
            n = self.db.maintain()
        except Exception as e:
            log.warning("request store %s: upkeep failed: %s", self.where, e)
            return
        if n:
            with self._cond:
                self.evicted += n
            log.info(
                "request store %s: over its size limit, dropped its %d oldest records",
                self.where,
                n,
            )

    def _failed(self, e: Exception) -> None:
        with self._cond:
            self._last_error = str(e) or type(e).__name__
            self._failures += 1

    def _log_failure(self, e: Exception, n: int, retry_s: float) -> None:
        # The first failure of an outage, then one line a minute: a database that is away
        # for an hour must not flood the log.
        now = time.monotonic()
        if self._failures > 1 and now - self._failure_logged_at < FAILURE_LOG_EVERY_S:
            return
        self._failure_logged_at = now
        log.warning(
            "request store %s: writing %d records failed (%s); retrying in %.2f s, "
            "%d waiting (at most %d, then new ones are dropped and counted)",
            self.where,
            n,
            e,
            retry_s,
            self.queued,
            self._max_queue,
        )

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

    def _done(
        self,
        batch: Iterable[RequestRecord],
        *,
        lost: int,
        ok: bool = False,
        journaled: bool = True,
    ) -> int:
        """Account for `batch` as written (`ok`: a write succeeded) or lost; with `ok`, the
        failed attempts it ended (0: there were none). `journaled` false: the journal
        keeps them (given up at close, for the next start to write)."""
        with self._cond:
            failures = 0
            if ok and self._last_error is not None:
                failures, self._failures, self._last_error = self._failures, 0, None
            n = 0
            pending = self._pending
            for r in batch:
                n += 1
                key = getattr(r, "request_id", None)
                if pending.get(key) is r:  # type: ignore[arg-type]
                    del pending[key]  # type: ignore[arg-type]
            self._done_seq += n
            self.dropped += lost
            self._cond.notify_all()
            finished = (
                self._journal.written_through(self._done_seq)
                if self._journal is not None and journaled
                else []
            )
        delete(finished)
        return failures

    def _give_up(self, batch: list[RequestRecord], e: Exception) -> None:
        # Closing and the database still fails: one failed attempt is enough, for the whole
        # queue, or shutdown would take a timeout per batch.
        with self._cond:
            rest = list(self._queue)
            self._queue.clear()
        lost = [*batch, *rest]
        self._lost_at_close += len(lost)
        log.error(
            "request store %s: closing with %d records that cannot be written (%s); lost",
            self.where,
            len(lost),
            e,
        )
        self._done(lost, lost=len(lost), journaled=False)

    def _log_drops(self) -> None:
        with self._cond:
            new = self.dropped - self._dropped_logged
            self._dropped_logged = self.dropped
        if new > 0:
            log.error(
                "request store %s: %d records dropped (%d in all); the queue holds at most "
                "%d unwritten records",
                self.where,
                new,
                self._dropped_logged,
                self._max_queue,
            )

    # --- reading ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"request store {self.where!r} is closed")

    def get(self, request_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """The energy object the client was told, by the proxy's id or the client's own
        x-request-id; None if unknown. `tenant`: only that tenant's requests (None: any,
        for admins). Several requests of the tenant under one client id: the latest.

        Records still queued are found too. Raises `StoreError` after `close` and when the
        database cannot be read."""
        self._check_open()
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
            return pending.energy()
        found = self.db.get(request_id, tenant)
        return None if found is None else found.energy()

    def summary(
        self, min_count: int = 1, *, tenant: str | None = None, since_s: float | None = None
    ) -> list[dict[str, Any]]:
        """Per model group x category over successful requests (status 200) finished from
        the hour `since_s` falls in (None: all kept), sorted by both: `{"model",
        "category", "count", "mean_joules", "mean_joules_per_token", "mean_co2eq_g"}`
        (`rollup.summary_rows`). Read from the rollups, plus the records still queued.
        `tenant`: only that tenant's requests (None: everyone's)."""
        self._check_open()
        since_hour = None if since_s is None else hour_of(since_s)
        with self._commit_lock:
            with self._cond:
                pending = list(self._pending.values())
            groups = self.db.sums(since_hour, tenant)
        queued = rollup(
            r
            for r in pending
            if (tenant is None or r.tenant == tenant)
            and (since_hour is None or hour_of(r.finished_at) >= since_hour)
        )
        for key, s in by_model_category(queued.items()).items():
            acc = groups.get(key)
            if acc is None:
                groups[key] = s
            else:
                acc.add(s)
        return summary_rows(groups, min_count)

    def tenants_usage(self, since_s: dict[str, float]) -> dict[str, tuple[float, float]]:
        """(joules, grams CO2eq) of each tenant's requests finished from the hour its
        `since_s` falls in, every status counted, the records still queued included: one
        pass over the queue, one read per tenant."""
        self._check_open()
        hours = {t: hour_of(s) for t, s in since_s.items()}
        out: dict[str, tuple[float, float]] = {}
        with self._commit_lock:
            with self._cond:
                pending = [r for r in self._pending.values() if r.tenant in hours]
            for tenant, since_hour in hours.items():
                out[tenant] = self.db.tenant_usage(tenant, since_hour)
        for r in pending:
            if hour_of(r.finished_at) >= hours[r.tenant]:
                joules, grams = out[r.tenant]
                joules += r.joules if math.isfinite(r.joules) else 0.0
                grams += r.co2eq_g if math.isfinite(r.co2eq_g) else 0.0
                out[r.tenant] = (joules, grams)
        return out

    def tenant_usage(self, tenant: str, since_s: float) -> tuple[float, float]:
        """`tenants_usage` of one tenant."""
        return self.tenants_usage({tenant: since_s})[tenant]

    def count(self, *, flush_timeout_s: float = 10.0) -> int:
        """Stored records (the queue is flushed first)."""
        self._check_open()
        self.flush(flush_timeout_s)
        return self.db.count()

    def prune(self, older_than_s: float, *, flush_timeout_s: float = 10.0) -> int:
        """Drop records finished more than `older_than_s` before now (`clock()`), and the
        rollups of hours that ended before then; how many records."""
        self._check_open()
        self.flush(flush_timeout_s)
        cutoff_s = self._clock() - older_than_s
        deleted = self.db.prune(cutoff_s)
        if deleted:
            log.info(
                "request store %s: pruned %d records before %.0f", self.where, deleted, cutoff_s
            )
        return deleted
