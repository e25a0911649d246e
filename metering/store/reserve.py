"""Disk space set aside beside the SQLite store at start, given back when the disk is full.

Making room on a full disk means deleting old records, and in write-ahead-log mode a
delete is itself a write: with no byte free, it fails, and the store could only queue
records until it dropped them. The reserve is a file of real blocks (`posix_fallocate`)
that the store deletes first when the disk is full, so the deletes and checkpoints that
give space back can run; it is made again once there is room.
"""

from __future__ import annotations

import contextlib
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
    held: bool = False

    def take(self, *, leave_bytes: int | None = None, partly: bool = False) -> bool:
        """Set the space aside (again); False where the disk has no room for it and
        `leave_bytes` more (None: as much again as the reserve, so that taking it at start
        does not itself fill the disk; 0 on a disk already full, where the store writes
        into the pages it freed). `partly`: what there is, where that is less (at least a
        block), better than none."""
        if self.held:
            return True
        leave = self.size_bytes if leave_bytes is None else leave_bytes
        try:
            free = shutil.disk_usage(self.path.parent).free - leave
            size = min(self.size_bytes, free) if partly else self.size_bytes
            if free < size or size < _BLOCK_BYTES:
                return False
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                _allocate(fd, size // _BLOCK_BYTES * _BLOCK_BYTES)
            finally:
                os.close(fd)
        except OSError as e:
            log.warning("could not set %d bytes aside at %s: %s", self.size_bytes, self.path, e)
            with contextlib.suppress(OSError):
                self.path.unlink()
            return False
        self.held = True
        return True

    def release(self) -> bool:
        """Give the space back to the disk; whether there was any."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            released = False
        else:
            released = True
        self.held = False
        return released


def _allocate(fd: int, size: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without it
            raise
        block = b"\0" * 65536
        for _ in range(0, size, len(block)):
            os.write(fd, block)
