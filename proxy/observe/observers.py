"""The observers of a finished request (proxy/observe/finished.py), beside the metrics
(proxy/observe/metrics.py, which observes too)."""

from __future__ import annotations

import dataclasses
import time

from metering.store import RequestRecord, RequestStore
from proxy.live.feed import LiveFeed, request_event
from proxy.observe.finished import RequestFinished
from proxy.observe.request_log import RequestLog


class TokenTallies:
    """Each backend's tally of the tokens the proxy saw, for the cross-check against the
    backend's own counters (backends/crosscheck.py)."""

    def finished(self, event: RequestFinished) -> None:
        tally = event.backend.traffic.tally
        tokens = event.report.tokens
        tally.prompt += tokens.prompt or 0
        tally.completion += tokens.completion


class StoreRecords:
    """Every finished request into the request store (queued: never blocks)."""

    def __init__(self, store: RequestStore) -> None:
        self.store = store

    def finished(self, event: RequestFinished) -> None:
        report = event.report
        if event.model_label == "other" and report.model != "other":
            # A name no backend lists (its model list unread, or any text a client sent):
            # stored as "other", as the metrics count it, never as a label of its own.
            report = dataclasses.replace(report, model="other")
        self.store.add(
            RequestRecord.from_report(
                report,
                backend=event.backend.name,
                status=event.status,
                finished_at=event.finished_at,
                tenant=event.tenant,
                model_group=event.model_label,
                route=event.route,
            )
        )


class LiveRequests:
    """Every finished request to the live page's feed."""

    def __init__(self, feed: LiveFeed) -> None:
        self.feed = feed

    def finished(self, event: RequestFinished) -> None:
        self.feed.finished(
            request_event(
                event.energy,
                backend=event.backend.name,
                status=event.status,
                finished_at=event.finished_at,
            ),
            event.tenant,
        )


class RequestLines:
    """One JSON line per finished request (ids, numbers and labels; never text)."""

    def __init__(self, log: RequestLog) -> None:
        self.log = log

    def finished(self, event: RequestFinished) -> None:
        report = event.report
        self.log.write(
            {
                "ts": time.time(),
                "request_id": report.request_id,
                "model": report.model,
                "backend": event.backend.name,
                "category": report.category,
                "status": event.status,
                "joules": round(report.energy_j, 6),
                "duration_s": round(report.duration_s, 6),
                "prompt_tokens": report.tokens.prompt,
                "completion_tokens": report.tokens.completion,
                "tenant": event.tenant or None,
                "client_request_id": report.client_request_id,
            }
        )
