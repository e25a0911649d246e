"""A real small filesystem for tests of a full disk: a tmpfs mounted for the test (root
with CAP_SYS_ADMIN, as in CI's containers), skipped where the machine does not allow one."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_tmpfs(where: Path, size_kb: int) -> Iterator[Path]:
    """A tmpfs of `size_kb` mounted at `where` (created) for the block; skips the test
    where mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"this machine does not allow a tmpfs: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path) -> None:
    """Write into `directory` until its filesystem has no room left."""
    block = b"\0" * 4096
    with (directory / "filler").open("ab", buffering=0) as fh:
        try:
            while True:
                fh.write(block)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise  # not the full disk that was wanted
