"""What the request store asks of a database (SQLite, PostgreSQL), and the writing rules
both follow.

A database has two sides. The writer side is used by the store's one writer thread:
`write(batch)` runs the batch's statements in an open transaction and `commit()` ends it
(the store commits under its own lock, so that a summary never counts a batch twice, once
queued and once stored). The read side (`get`, `sums`, `count`, `prune`) may be called from
any thread; each database serialises it on a connection of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from metering.store.columns import encode, label_texts
from metering.store.records import RequestRecord, id_key
from metering.store.rollup import Sums

# Errors that come from one record's data, not from the database: retrying cannot help, so
# such a record is written alone, and dropped (logged, counted) if it still fails.
DATA_ERRORS: tuple[type[Exception], ...] = (
    AttributeError,  # not a RequestRecord at all
    TypeError,
    ValueError,
    OverflowError,
    UnicodeError,
)


# Records encoded between two statements: a chunk's Python work (about a millisecond) is
# followed by a statement during which the database driver releases the GIL, so the event
# loop's thread never waits long for the writer's.
WRITE_CHUNK_RECORDS = 100


@dataclass(slots=True)
class Written:
    """What `write` did: the records refused for their data (they will never be stored) and
    how many were already stored (the same id written twice: the first one stays)."""

    rejected: list[RequestRecord] = field(default_factory=list)
    duplicates: int = 0


def screen(
    chunk: Sequence[RequestRecord], seen: set[bytes], out: Written, *, nul_ok: bool = True
) -> tuple[list[RequestRecord], set[str]]:
    """The chunk's records that can be written (not refused for their data, not an id
    seen earlier in the batch: the first stays), and their label texts. `nul_ok=False`
    refuses text with a NUL character (PostgreSQL's text cannot hold one)."""
    records: list[RequestRecord] = []
    texts: set[str] = set()
    for r in chunk:
        try:
            key = id_key(r.request_id)
            labels = label_texts(r)
            if not all(type(t) is str for t in labels):
                raise TypeError("a label is not a string")
            if not nul_ok and any("\x00" in t for t in (*labels, r.client_request_id or "")):
                raise ValueError("text with a NUL character")
        except DATA_ERRORS:
            out.rejected.append(r)
            continue
        if key in seen:
            out.duplicates += 1
            continue
        seen.add(key)
        records.append(r)
        texts.update(labels)
    return records, texts


def encode_all(
    records: Sequence[RequestRecord], label: Callable[[str], int], out: Written
) -> tuple[list[tuple[object, ...]], list[RequestRecord]]:
    """The rows of `records` (labels already staged, see `screen`) and the records they
    are, in the same order; a record that does not encode is refused in `out`."""
    rows: list[tuple[object, ...]] = []
    good: list[RequestRecord] = []
    for r in records:
        try:
            rows.append(encode(r, label))
        except DATA_ERRORS:
            out.rejected.append(r)
            continue
        good.append(r)
    return rows, good


class Database(Protocol):
    kind: str  # "sqlite" | "postgresql"
    where: str  # the path, or the URL without its password: for messages

    # --- the writer side (one thread) --------------------------------------------------

    def write(self, batch: Sequence[RequestRecord]) -> Written:
        """Insert `batch` and add its successful requests to the rollups, in one open
        transaction, first write winning for an id already stored. Raises on failures
        that a later retry may cure (disk, locks, connection); the transaction is then
        rolled back."""
        ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    def is_full(self, error: BaseException) -> bool:
        """Whether `error` says the database has no room (its size limit or the disk)."""
        ...

    def make_room(self) -> int:
        """Drop the oldest records to make room; how many (0: nothing left to drop)."""
        ...

    def room_wanted(self) -> bool:
        """After a commit: whether the disk is full enough that room should be made now,
        before the next write fails (asked once: the answer is reset)."""
        ...

    def maintain(self) -> int:
        """Periodic upkeep on the writer's connection (the size limit where the database
        cannot enforce it itself); records dropped."""
        ...

    def close_writer(self) -> None: ...

    # --- the read side (any thread) ----------------------------------------------------

    def get(self, request_id: str, tenant: str | None) -> RequestRecord | None:
        """The record by the proxy's id or, failing that, the latest with that client id;
        `tenant`: only that tenant's."""
        ...

    def tenant_usage(self, tenant: str, since_hour: int) -> tuple[float, float]:
        """(joules, grams CO2eq) of every request of `tenant` ("": without a key) that
        finished from the hour `since_hour` on, whatever its status: what budgets count."""
        ...

    def sums(self, since_hour: int | None, tenant: str | None) -> dict[tuple[str, str], Sums]:
        """Rollups from `since_hour` on (None: all), summed per (model group, category)."""
        ...

    def count(self) -> int: ...

    def prune(self, cutoff_s: float) -> int:
        """Drop records finished before `cutoff_s` (unix seconds), oldest first, and rollups
        of hours that ended before it; records dropped."""
        ...

    def close_reader(self) -> None: ...
