"""The request store: records of finished requests and the rollups summaries read.

SQLite (`sqlite.py`) is the embedded default; PostgreSQL (`postgres.py`) is one store for a
fleet of proxies. `writer.py` is the part both share: the queue, the writer thread, and the
rule that the request path never waits on, or fails because of, the database.
"""

from metering.store.records import RequestRecord, StoreError
from metering.store.request_store import RequestStore
from metering.store.status import StoreStatus

__all__ = ["RequestRecord", "RequestStore", "StoreError", "StoreStatus"]
