"""The store's health, as `/readyz` and the metrics show it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class StoreStatus:
    """The store's health, for `/readyz` and the metrics."""

    kind: str
    where: str
    queued: int  # accepted, not yet written
    dropped: int  # never stored (queue full, closed, refused for their data)
    evicted: int  # stored, then dropped to make room (the rollups keep them)
    writing: bool  # the last write succeeded (or none was needed yet)
    last_error: str | None  # the latest write error, if the last write failed
    max_mb: float | None
    journal: str | None = None  # where records go before the database has them (None: off)
    journal_failed: int = 0  # records the journal could not take (disk full, read-only)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "where": self.where,
            "ok": self.writing,
            "queued": self.queued,
            "dropped": self.dropped,
            "evicted": self.evicted,
            "error": self.last_error,
            "max_mb": self.max_mb,
            "journal": self.journal,
            "journal_failed": self.journal_failed,
        }
