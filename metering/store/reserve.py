"""Disk space set aside beside the SQLite store at start, given back when the disk is full.

Making room on a full disk means deleting old records, and in write-ahead-log mode a
delete is itself a write: with no byte free, it fails, and the store could only queue
records until it dropped them. The reserve is a file of real blocks (`posix_fallocate`)
that the store deletes first when the disk is full, so the deletes and checkpoints that
give space back can run; it is made again once there is room.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("energy_proxy.store")

RESERVE_BYTES = 1024 * 1024
_BLOCK_BYTES = 4096


@dataclass(slots=True)
class Reserve:
    path: Path
    size_bytes: int = RESERVE_BYTES
    held_bytes: int = 0  # what is set aside now (less than `size_bytes` when taken in part)

    @property
    def held(self) -> bool:
        return self.held_bytes > 0

    def take(self, *, leave_bytes: int | None = None, partly: bool = False) -> bool:
        """Set the space aside (again, or what was set aside in part made whole); whether
        it is held in full (`partly`: held at all). Not where the disk has no room for it
        and `leave_bytes` more (None: as much again as the reserve, so that taking it at
        start does not itself fill the disk; 0 on a disk already full, where the store
        writes into the pages it freed). `partly`: what there is, where that is less (a
        block at least), better than none. A reserve file already there (a store that
        stopped) is the store's own."""
        if self.held_bytes >= self.size_bytes:
            return True
        have = _allocated(self.path)
        if have >= self.size_bytes:
            self.held_bytes = have
            return True
        leave = self.size_bytes if leave_bytes is None else leave_bytes
        try:
            free = shutil.disk_usage(self.path.parent).free + have - leave
            size = min(self.size_bytes, free) if partly else self.size_bytes
            size = size // _BLOCK_BYTES * _BLOCK_BYTES
            if free < size or size < _BLOCK_BYTES or size <= have:
                if have:  # what is there stays set aside
                    self.held_bytes = have
                return partly and self.held
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                _allocate(fd, size)
            finally:
                os.close(fd)
        except OSError as e:
            log.warning("could not set %d bytes aside at %s: %s", self.size_bytes, self.path, e)
            self.release()
            return False
        self.held_bytes = size
        return partly or size >= self.size_bytes

    def release(self) -> bool:
        """Give the space back to the disk; whether there was any."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            released = False
        else:
            released = True
        self.held_bytes = 0
        return released


def _allocated(path: Path) -> int:
    """The bytes a file holds on its disk (0: none there)."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def _allocate(fd: int, size: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without it
            raise
        block = b"\0" * 65536
        for _ in range(0, size, len(block)):
            os.write(fd, block)
