"""Where the store's files go, and how large it may grow by default: the size limit from
the disk the SQLite file is on, the journal beside it (or in the state directory for
PostgreSQL). Read once at start."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("energy_proxy.store")

DEFAULT_MAX_MB = 1024.0
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def default_max_bytes(db: str) -> int:
    """The size limit when none is set: 1024 MB, or half the space its filesystem has for
    a SQLite store (the free space and what the store takes: its file, log and reserve)
    when that is less, so that the store alone never fills a disk; never less than what
    it takes, so that a restart on a disk that others filled keeps what it has."""
    limit = int(DEFAULT_MAX_MB * 1e6)
    if db.startswith(POSTGRES_SCHEMES):
        return limit
    path = Path(db).expanduser().resolve()
    probe = next((p for p in (path.parent, *path.parents) if p.exists()), None)
    if probe is None:
        return limit
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return limit
    own = sum(_size(Path(f"{path}{suffix}")) for suffix in ("", "-wal", ".reserve"))
    return max(1_000_000, min(limit, max(own, (free + own) // 2)))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def journal_prefix(db: str, setting: str | None) -> Path | None:
    """Where the journal's segments go: for "auto", beside a SQLite file
    (`requests.db.journal.*.jsonl`) or in the state directory for PostgreSQL
    (`postgres-HASH.journal.*.jsonl`, one per database); "off" or None: no journal.
    None too, with a warning, where that directory cannot be written (the store works,
    without the journal)."""
    if setting is None or setting == "off" or db == ":memory:":
        return None
    if setting != "auto":
        prefix = Path(setting).expanduser()
    elif db.startswith(POSTGRES_SCHEMES):
        # One journal per database (the URL without its password): a proxy replays only
        # what was meant for its own store.
        from metering.store.postgres import redact

        state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        digest = hashlib.sha256(redact(db).encode()).hexdigest()[:12]
        prefix = Path(state) / "energy-proxy" / f"postgres-{digest}.journal"
    else:
        prefix = Path(db).expanduser().with_name(Path(db).name + ".journal")
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("no journal for the request store (%s): %s", prefix.parent, e)
        return None
    if not os.access(prefix.parent, os.W_OK):
        log.warning("no journal for the request store: %s is not writable", prefix.parent)
        return None
    return prefix
