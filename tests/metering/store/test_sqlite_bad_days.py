"""The SQLite store on a bad day, with real files and real processes: its files cut short
under it never kill the process (no `-shm` mapped into memory: a mapped file that shrinks
kills with SIGBUS), a second process on the same file is refused with what to do, and a
full disk is met by dropping old records into space reserved at start."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from metering.store import RequestStore, StoreError
from tests.support.paths import REPO_ROOT
from tests.support.polling import wait_for
from tests.support.storekit import STORE_LOG, make_record, rid
from tests.support.tmpfs import fill, small_tmpfs

# Writes records in batches until told to stop on stdin; says how many it stored.
_WRITER = textwrap.dedent(
    """
    import select, sys
    from metering.store import RequestStore
    from tests.support.storekit import make_record, rid
    store = RequestStore.open(sys.argv[1], linger_s=0.001)
    i = 0
    print("open", flush=True)
    while not select.select([sys.stdin], [], [], 0)[0]:
        for _ in range(50):
            i += 1
            store.add(make_record(rid(i)))
        store.flush()
    store.close()
    print("added", i, flush=True)
    """
)


def _writer(db: Path) -> subprocess.Popen[str]:
    """The writer child on `db`, once it has the store open."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db)],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "open"
    return proc


def test_files_cut_short_under_the_store_do_not_kill_it(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    proc = _writer(db)
    # What another program (or a full disk) can do to the files beside the database.
    assert wait_for(lambda: Path(f"{db}-wal").exists(), timeout_s=30)
    assert not Path(f"{db}-shm").exists()  # the WAL index is in the process's memory
    shm = Path(f"{db}-shm")
    shm.write_bytes(b"")  # an empty -shm where SQLite would map one
    shm.chmod(0)
    time.sleep(0.3)  # it writes on meanwhile (the test asserts no time)
    out, err = proc.communicate("stop\n", timeout=60)
    assert proc.returncode == 0, (proc.returncode, err[-2000:])  # -7 was SIGBUS
    assert out.split()[-2] == "added"


def test_a_second_process_on_the_same_file_is_refused_with_what_to_do(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    proc = _writer(db)
    try:
        with pytest.raises(StoreError, match="its own SQLite --db"):
            RequestStore.open(str(db), busy_timeout_s=0.2)
    finally:
        proc.communicate("stop\n", timeout=60)
    with RequestStore.open(str(db)) as store:  # once it is gone, the file is free
        assert store.count() > 0


def test_a_full_disk_drops_old_records_and_goes_on_writing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with small_tmpfs(tmp_path / "disk", 4096) as disk:
        db = disk / "r.db"
        # A size limit above the disk: the disk fills first.
        store = RequestStore.open(str(db), max_mb=6, journal="auto", linger_s=0.001)
        for i in range(1, 2001):
            store.add(make_record(rid(i)))
        assert store.flush()
        fill(disk)  # another program takes what is left
        caplog.set_level(logging.WARNING, logger=STORE_LOG)
        for i in range(2001, 4001):
            store.add(make_record(rid(i)))
        assert store.flush(timeout_s=60)
        status = store.status()
        assert status.evicted > 0, [r.getMessage() for r in caplog.records][-5:]
        assert status.writing, status.last_error
        assert store.get(rid(4000)) is not None
        store.close()
        # Closed with everything written: the journal is gone, nothing to replay.
        assert list(disk.glob("r.db.journal.*")) == []
        with RequestStore.open(str(db), max_mb=6) as again:
            got = again.get(rid(4000))
            assert got is not None  # the newest are kept, the oldest dropped
            assert again.get(rid(1)) is None


def test_an_in_memory_database_is_refused_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="file path"):
        RequestStore.open(":memory:")
