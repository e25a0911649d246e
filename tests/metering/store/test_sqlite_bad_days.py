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


@pytest.mark.parametrize(
    ("disk_kb", "max_mb", "before"),
    [
        (16384, None, 3000),  # the default limit (half the free space at start)
        (4096, 6, 2000),  # a limit above the disk: the disk fills first
        (65536, None, 1000),  # a store nearly empty when the disk fills
    ],
)
def test_a_full_disk_drops_old_records_and_goes_on_writing(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    disk_kb: int,
    max_mb: float | None,
    before: int,
) -> None:
    """Another program takes what the disk has left, and the proxy goes on answering for
    many times what its store held: every record is written (or, the oldest, dropped to
    make room and counted), none lost, writing never stops."""
    after = 30_000
    with small_tmpfs(tmp_path / "disk", disk_kb) as disk:
        db = disk / "r.db"
        store = RequestStore.open(str(db), max_mb=max_mb, journal="auto", linger_s=0.001)
        for i in range(1, before + 1):
            store.add(make_record(rid(i)))
        assert store.flush()
        fill(disk)
        caplog.set_level(logging.WARNING, logger=STORE_LOG)
        last = before + after
        for i in range(before + 1, last + 1):
            store.add(make_record(rid(i)))
            if i % 1000 == 0:  # the pressure sustained: flushed every thousand
                logged = [r.getMessage() for r in caplog.records][-3:]
                assert store.flush(timeout_s=60), (i, store.status(), logged)
        status = store.status()
        assert status.evicted > 0
        assert status.writing, status.last_error
        assert status.dropped == 0 and status.queued == 0
        assert store.count() + status.evicted == last  # each one stored or counted out
        assert store.get(rid(last)) is not None
        store.close()
        # Closed with everything written: the journal is gone, nothing to replay.
        assert list(disk.glob("r.db.journal.*")) == []
        with RequestStore.open(str(db), max_mb=max_mb) as again:
            assert again.get(rid(last)) is not None  # the newest are kept
            assert again.get(rid(1)) is None  # the oldest dropped


def test_an_in_memory_database_is_refused_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="file path"):
        RequestStore.open(":memory:")


def _on_disk(path: Path) -> int:
    """The bytes a file holds on its disk; 0 where it is not there."""
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def test_the_reserve_is_whole_again_once_the_disk_has_room(tmp_path: Path) -> None:
    """A disk kept full leaves the store a reserve in part at best; the day the other
    program's files go, the store sets the whole of it aside again (else the next full
    disk would find none to make room with), and a restart keeps it."""
    with small_tmpfs(tmp_path / "disk", 65536) as disk:
        db, reserve = disk / "r.db", disk / "r.db.reserve"
        store = RequestStore.open(str(db), journal="auto", linger_s=0.001)
        whole = _on_disk(reserve)
        assert whole > 0
        added = 0

        def add(n: int) -> None:
            nonlocal added
            for _ in range(n):
                added += 1
                store.add(make_record(rid(added)))
            assert store.flush(timeout_s=60)

        add(1000)  # a small store when the disk fills: a reserve in part
        fill(disk)
        while store.status().evicted == 0 and added < 60_000:
            add(1000)
        assert store.status().evicted > 0
        (disk / "filler").unlink()  # the disk has room again
        for _ in range(6):
            add(500)
        assert _on_disk(reserve) == whole
        store.close()
        with RequestStore.open(str(db), journal="auto") as again:
            assert again.get(rid(added)) is not None
            assert _on_disk(reserve) == whole
