"""The store's journal: records added by a process killed with SIGKILL before its writer
committed them are written at the next start; a clean close leaves no journal; a second
live process's segments are not taken; a journal that cannot be written degrades to the
store without it. Real SQLite files, real child processes, a real SIGKILL."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from metering.store import RequestStore
from metering.store.journal import Journal, decode, encode, read_segment
from tests.metering.store.test_sqlite import locked as locked_store_file
from tests.support.paths import REPO_ROOT
from tests.support.polling import wait_for
from tests.support.storekit import STORE_LOG, make_record, rid
from tests.support.tmpfs import fill, small_tmpfs

# A child that adds records to a store whose writer waits an hour to commit (so none is
# in the database), says so, and is killed where it stands.
_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from metering.store import RequestStore
    from tests.support.storekit import make_record, rid
    db, first, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = RequestStore.open(db, journal=sys.argv[5], linger_s=3600.0, batch_records=10**6)
    for i in range(first, first + n):
        store.add(make_record(rid(i), joules=float(i)))
    print("added", flush=True)
    if sys.argv[4] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.readline()  # held open until the parent says
    """
)


def _child(db: Path, first: int, n: int, how: str, journal: str = "auto") -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(db), str(first), str(n), how, journal],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "added"
    return proc


def _segments(db: Path) -> list[Path]:
    return sorted(db.parent.glob(db.name + ".journal.*.jsonl"))


def test_records_of_a_killed_process_are_written_at_the_next_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "requests.db"
    proc = _child(db, 1, 300, "kill")
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert _segments(db), "the killed process left no journal"
    with RequestStore.open(str(db)) as plain:  # without the journal: nothing was written
        assert plain.count() == 0
    caplog.set_level(logging.WARNING, logger=STORE_LOG)
    with RequestStore.open(str(db), journal="auto") as store:
        assert store.count() == 300
        got = store.get(rid(17))
        assert got is not None and got["joules"] == 17.0
    assert any("300 records from the journal" in r.getMessage() for r in caplog.records)
    assert _segments(db) == []  # written, then a clean close: nothing left to replay
    with RequestStore.open(str(db), journal="auto") as again:
        assert again.count() == 300  # replayed once, never twice


def test_a_second_live_process_keeps_its_own_segments(tmp_path: Path) -> None:
    # Two proxies of a fleet on one host share the state directory's journal (their
    # PostgreSQL store is one): two SQLite files stand in for it here, as a SQLite file
    # is one process's alone.
    shared = tmp_path / "fleet.journal"
    live = _child(tmp_path / "a.db", 1, 5, "hold", journal=str(shared))
    try:
        theirs = sorted(tmp_path.glob("fleet.journal.*.jsonl"))
        assert len(theirs) == 1
        with RequestStore.open(str(tmp_path / "b.db"), journal=str(shared)) as store:
            assert store.count() == 0  # another process's unwritten records are its own
        assert sorted(tmp_path.glob("fleet.journal.*.jsonl")) == theirs  # not taken
    finally:
        live.kill()
        live.communicate(timeout=30)
    with RequestStore.open(str(tmp_path / "b.db"), journal=str(shared)) as store:
        assert store.count() == 5  # once it is gone, they are


def test_segments_written_through_are_deleted_as_the_writer_goes(tmp_path: Path) -> None:
    db = tmp_path / "requests.db"
    store = RequestStore.open(str(db), journal="auto", linger_s=0.01)
    assert store._journal is not None
    store._journal.segment_bytes = 2_000  # a few records a segment
    for i in range(1, 201):
        store.add(make_record(rid(i)))
        if i % 50 == 0:
            assert store.flush()
    # Closed segments whose records are committed are gone (the writer deletes them just
    # after the commit that flush waited for); only the open one stays.
    assert wait_for(lambda: len(_segments(db)) == 1), _segments(db)
    store.close()
    assert _segments(db) == []


def test_a_journal_on_a_full_disk_costs_only_the_journal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with small_tmpfs(tmp_path / "small", 256) as small:
        store = RequestStore.open(str(tmp_path / "r.db"), journal=str(small / "j"))
        fill(small)
        caplog.set_level(logging.WARNING, logger=STORE_LOG)
        with store:
            for i in range(1, 4):
                store.add(make_record(rid(i)))
            assert store.count() == 3  # the records themselves are stored
            status = store.status()
            assert status.journal == str(small / "j")
            assert status.journal_failed == 3
        warned = [r for r in caplog.records if "journal" in r.getMessage()]
        assert len(warned) == 1  # once, not per request


def test_a_line_round_trips_and_a_torn_line_is_skipped(tmp_path: Path) -> None:
    record = make_record(rid(5), joules=1 / 3)
    assert decode(encode(record)) == record
    seg = tmp_path / "x.journal.1.1.jsonl"
    seg.write_bytes(encode(record) + b'{"request_id": "req-0')  # cut by a power loss
    assert read_segment(seg) == [record]
    # An older record (fewer fields) takes the new fields' defaults.
    assert decode(b'{"request_id": "r"}') is None  # required fields missing: not a record


def test_segments_of_another_prefix_are_not_read(tmp_path: Path) -> None:
    (tmp_path / "other.db.journal.1.1.jsonl").write_bytes(encode(make_record(rid(1))))
    journal = Journal(tmp_path / "requests.db.journal")
    assert journal.leftovers() == []


def test_records_given_up_at_close_stay_in_the_journal_for_the_next_start(
    tmp_path: Path,
) -> None:
    db = tmp_path / "r.db"
    store = RequestStore.open(str(db), journal="auto", busy_timeout_s=0.02,
                              retry_initial_s=0.01, retry_max_s=0.05)  # fmt: skip
    with locked_store_file(db):
        for i in range(1, 31):
            store.add(make_record(rid(i)))
        store.close(timeout_s=0.1)  # the database refuses: given up
    assert store.dropped == 30
    assert _segments(db), "the journal was emptied of records never written"
    with RequestStore.open(str(db), journal="auto") as again:
        assert again.count() == 30


def test_a_segment_left_by_an_earlier_process_of_the_same_pid_is_not_written_into(
    tmp_path: Path,
) -> None:
    prefix = tmp_path / "r.db.journal"
    mine = tmp_path / f"r.db.journal.{os.getpid()}.1.jsonl"
    mine.write_bytes(encode(make_record(rid(1))))  # a container's pid 1, restarted
    store = RequestStore.open(str(tmp_path / "r.db"), journal=str(prefix), linger_s=3600.0)
    try:
        store.add(make_record(rid(2)))
        segments = sorted(tmp_path.glob("r.db.journal.*.jsonl"))
        assert len(segments) == 2  # the old one (replayed) and a new one beside it
        assert mine.read_bytes().count(b"\n") == 1  # nothing appended to the old
    finally:
        store.close()
    assert sorted(tmp_path.glob("r.db.journal.*.jsonl")) == []
