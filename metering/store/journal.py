"""The store's journal: each record handed to the operating system as it is accepted, so
that a proxy killed before its writer committed (SIGKILL, the OOM killer) loses no
answered request. Replayed at the next start; the database ignores what it already has.

One `os.write` of one JSON line per record, into segment files beside the database
(`<prefix>.<pid>.<n>.jsonl`). A write that returned is in the kernel's page cache: it
survives the process, not a power cut (no fsync: that would put a disk flush on every
request). A segment is closed past `SEGMENT_BYTES` and deleted once the writer has
committed every record in it; all of them at a clean close. Each segment holds an
exclusive `flock` until its records are written, so a second proxy on the same journal
(proxies of one fleet on one host) replays only segments no live process holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from metering.store.records import RequestRecord

log = logging.getLogger("energy_proxy.store")

SEGMENT_BYTES = 4 * 1024 * 1024
_FIELDS = tuple(f.name for f in dataclasses.fields(RequestRecord))
_FIELD_SET = frozenset(_FIELDS)


def encode(record: RequestRecord) -> bytes:
    """One record as one JSON line (field names kept: a newer version replays an older
    journal, new fields taking their defaults)."""
    return orjson.dumps({name: getattr(record, name) for name in _FIELDS}) + b"\n"


def decode(line: bytes) -> RequestRecord | None:
    """A record from its line; None for anything else (a line cut by a power cut)."""
    try:
        doc = orjson.loads(line)
        if not isinstance(doc, dict):
            return None
        return RequestRecord(**{k: v for k, v in doc.items() if k in _FIELD_SET})
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return None


@dataclass(slots=True)
class _Segment:
    path: Path
    fd: int | None  # open while it is the one written; locked while open
    last_seq: int = 0  # the store's sequence number of its last record
    size: int = 0


@dataclass(slots=True)
class Journal:
    """Segments under `prefix` (a path: its directory and the start of the file names).
    Not thread-safe: the store calls it under its own lock."""

    prefix: Path
    segment_bytes: int = SEGMENT_BYTES
    failures: int = 0  # appends refused (disk full, read-only) or skipped while paused
    # While the store makes room on a full disk: what it frees is for the database (the
    # journal would take it first, being written on every request).
    paused: bool = False
    _current: _Segment | None = None
    _closed: list[_Segment] = field(default_factory=list)
    _counter: int = 0

    def _pattern(self) -> re.Pattern[str]:
        return re.compile(re.escape(self.prefix.name) + r"\.\d+\.\d+\.jsonl")

    def _open_segment(self) -> _Segment:
        """A new segment, created (never one that exists: a process of the same pid
        before this one, in a container that restarted, left its own) and locked."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        while True:
            self._counter += 1
            name = f"{self.prefix.name}.{os.getpid()}.{self._counter}.jsonl"
            path = self.prefix.with_name(name)
            try:
                fd = os.open(path, flags, 0o600)
            except FileExistsError:
                continue
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        return _Segment(path, fd)

    def append(self, record: RequestRecord, seq: int) -> bool:
        """Hand `record` (the store's `seq`-th) to the operating system; False when it
        refused or the journal is paused (the record is still queued in memory: only a
        crash would lose it)."""
        if self.paused:
            self.failures += 1
            return False
        try:
            line = encode(record)
            seg = self._current
            if seg is None or seg.size >= self.segment_bytes:
                if seg is not None:
                    self._current = None
                    self._closed.append(seg)  # its lock held until it is written
                seg = self._current = self._open_segment()
            assert seg.fd is not None
            written = os.write(seg.fd, line)
            if written != len(line):
                # A disk that filled mid-line: the torn line cut off again.
                os.ftruncate(seg.fd, seg.size)
                raise OSError("the journal's disk is full")
        except (OSError, TypeError, ValueError):
            self.failures += 1
            return False
        seg.size += len(line)
        seg.last_seq = seq
        return True

    @staticmethod
    def _release(seg: _Segment) -> None:
        if seg.fd is not None:
            with contextlib.suppress(OSError):
                os.close(seg.fd)  # the lock goes with it
            seg.fd = None

    def written_through(self, done_seq: int) -> list[Path]:
        """The writer has committed every record up to `done_seq`: the closed segments
        holding only such records are done with. Returns their paths, to delete outside
        the store's lock (`delete`)."""
        done = [s for s in self._closed if s.last_seq <= done_seq]
        if done:
            self._closed = [s for s in self._closed if s.last_seq > done_seq]
            for s in done:
                self._release(s)
        seg = self._current
        if seg is not None and seg.fd is not None and seg.size and seg.last_seq <= done_seq:
            # Everything in the open segment is written too: emptied (a quiet store's
            # journal holds nothing, and a full disk gets its space back).
            try:
                os.ftruncate(seg.fd, 0)
                seg.size = 0
            except OSError as e:
                log.warning("journal %s could not be emptied: %s", seg.path, e)
        return [s.path for s in done]

    def close(self, *, everything_written: bool) -> list[Path]:
        """Stop writing. With `everything_written`, every segment is done with (returned,
        to delete); else they stay for the next start to replay."""
        if self._current is not None:
            self._closed.append(self._current)
            self._current = None
        for seg in self._closed:
            self._release(seg)
        if not everything_written:
            return []
        paths = [s.path for s in self._closed]
        self._closed = []
        return paths

    # --- at start ------------------------------------------------------------------------

    def leftovers(self) -> list[Path]:
        """Segments a process that is gone left: not held by a live one."""
        pattern = self._pattern()
        try:
            names = sorted(
                (p for p in self.prefix.parent.iterdir() if pattern.fullmatch(p.name)),
                key=lambda p: [int(n) for n in p.name.rsplit(".", 3)[1:3]],
            )
        except OSError:
            return []
        return [p for p in names if _unheld(p)]

    def adopt(self, path: Path, last_seq: int) -> None:
        """A replayed segment, whose records are the store's up to `last_seq`: deleted
        once they are written."""
        self._closed.append(_Segment(path, None, last_seq=last_seq))


def read_segment(path: Path) -> list[RequestRecord]:
    """The records in one segment, in order (lines that are not records skipped, logged)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        log.warning("journal %s could not be read: %s", path, e)
        return []
    records = []
    skipped = 0
    for line in data.splitlines():
        record = decode(line)
        if record is not None:
            records.append(record)
        elif line.strip():
            skipped += 1
    if skipped:
        log.warning("journal %s: %d lines that are not records, skipped", path, skipped)
    return records


def _unheld(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # a live process writes it
    finally:
        os.close(fd)
    return True


def delete(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
